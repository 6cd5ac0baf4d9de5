//! The config as the agent uses it: typed, validated, with every default applied.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use vip_common::{IPPROTO_TCP, IPPROTO_UDP, VipKey};

/// Durations show as seconds in the effective config (`check-config --print-effective`).
fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Secrets never show in the effective config.
fn redacted<S: serde::Serializer>(secret: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bool(secret.is_some())
}

/// How to attach XDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Driver mode; fail if the driver lacks XDP.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
    /// Driver mode, falling back to generic mode (and saying so).
    #[default]
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Its name in configs, labels and names: `tcp`, `udp`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
}

/// Which fields of a flow pick its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashFields {
    /// Addresses, ports and protocol.
    #[default]
    FiveTuple,
    /// Addresses and protocol: a client sticks to one backend (and fragments are forwarded).
    Addresses,
}

/// Encapsulation toward backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encapsulation {
    /// IPIP / IP6IP6 / 4in6 / 6in4, by the families of VIP and backend.
    #[default]
    Ipip,
    /// GUE (variant 1, UDP to `gue_port`): backends spread flows over their queues by the
    /// UDP source port.
    Gue,
}

/// Where the agent's control socket is unless `node.control_socket` says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/vip/vip.sock";

/// Default GUE port (as Linux `fou` examples use).
pub const DEFAULT_GUE_PORT: u16 = 6080;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    /// No new flows; flows in conntrack continue.
    Draining,
}

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Load balancer: XDP load-balancing program, `[[vip]]` with backends.
    #[default]
    Lb,
    /// Backend: decapsulation program, the `[backend]` section.
    Backend,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub node: NodeConfig,
    pub vips: Vec<VipConfig>,
    /// Set when `node.role = "backend"`.
    pub backend: Option<BackendRole>,
    /// BGP speaker settings, when vip announces VIPs over BGP itself.
    pub bgp: Option<BgpConfig>,
    /// Routes in a kernel table instead (`[announce] mode = "kernel"`), for a routing daemon
    /// on the node to announce.
    pub kernel_routes: Option<KernelRoutesConfig>,
    /// VIP addresses that backends also use as their source, and who owns which ports.
    pub egress: Vec<EgressConfig>,
    /// Flow-state sharing with the tier's other LB nodes.
    pub sync: Option<SyncConfig>,
}

/// Defaults of `[sync]`.
pub const DEFAULT_SYNC_ENTRIES_PER_SECOND: u32 = 1_000_000;
pub const DEFAULT_SYNC_FETCH_TIMEOUT_SECS: u64 = 3;
pub const DEFAULT_SYNC_REFRESH_SECS: u64 = 30;
/// The shortest key accepted, in bytes.
pub const MIN_SYNC_KEY_LEN: usize = 16;

/// Flow-state sharing: the LB nodes of a tier push each other the flows that the current
/// tables would send elsewhere (see the `sync` module).
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct SyncConfig {
    /// Where peers connect (TCP).
    pub listen: SocketAddr,
    /// The other LB nodes' `listen` addresses: only they may connect, only to them is pushed.
    pub peers: Vec<SocketAddr>,
    /// The tier's shared key (HMAC-SHA256); never shown.
    #[serde(skip)]
    pub key: Vec<u8>,
    /// Entries one peer may deliver per second; beyond, its connection is refused.
    pub max_entries_per_second: u32,
    /// At start, how long to wait for every peer's exceptions before announcing.
    #[serde(serialize_with = "seconds")]
    pub fetch_timeout: Duration,
    /// How often every exception is pushed again (keeps peers' copies and UDP ages fresh).
    #[serde(serialize_with = "seconds")]
    pub refresh: Duration,
}

impl fmt::Debug for SyncConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncConfig")
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("max_entries_per_second", &self.max_entries_per_second)
            .field("fetch_timeout", &self.fetch_timeout)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

/// How long a block waits, by default, after its backend left before another may take it:
/// twice the 60 s that Linux keeps a closed TCP connection in TIME_WAIT.
pub const DEFAULT_EGRESS_REST_SECS: u64 = 120;

/// A VIP address as backends' source: connections that backends open from it get their replies
/// through any LB node, which sends each reply to the owner of the block its destination port
/// falls in. The same section on every node: load balancers build the owner table from it,
/// each backend finds its own block in it and source-NATs into that block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressConfig {
    pub vip: IpAddr,
    /// The ports set aside for egress, `first..=last`: none of them is a served port.
    pub first_port: u16,
    pub last_port: u16,
    /// Ports per block; the range holds a whole number of blocks.
    pub block_size: u16,
    /// A block whose backend left waits this long before another backend may take it, so
    /// late replies of the old owner's connections reach nobody rather than the new owner.
    #[serde(serialize_with = "seconds")]
    pub rest: Duration,
    /// Who owns which block; blocks are given in the config, so every node agrees.
    pub backends: Vec<EgressBackend>,
}

/// A backend's block of egress ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EgressBackend {
    pub address: IpAddr,
    /// Block index: ports `first_port + block * block_size` and on.
    pub block: u16,
}

impl EgressConfig {
    /// How many blocks the range holds.
    pub fn blocks(&self) -> u32 {
        (u32::from(self.last_port) - u32::from(self.first_port) + 1) / u32::from(self.block_size)
    }

    /// The ports of block `block`, first and last.
    pub fn block_ports(&self, block: u16) -> (u16, u16) {
        let first = u32::from(self.first_port) + u32::from(block) * u32::from(self.block_size);
        (
            first as u16,
            (first + u32::from(self.block_size) - 1) as u16,
        )
    }
}

/// Announcer mode `kernel`: each VIP that can be forwarded is a host route (`dev lo`) in a
/// routing table, with vip's own protocol number, for BIRD or FRR on the node to announce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelRoutesConfig {
    /// The routing table (not `local`, `main` or `default`).
    pub table: u32,
    /// The routes' protocol number (`ip route ... proto N`): how vip knows its own routes.
    pub protocol: u8,
    /// On drain (`vip-agent drain`, SIGTERM): routes stay this long before they go.
    #[serde(serialize_with = "seconds")]
    pub drain_time: Duration,
}

/// The metrics listener's default port: outside 9100-9999, the range Prometheus allocates to
/// exporters (node_exporter has 9100), so it meets none of them on a node.
pub const DEFAULT_METRICS_PORT: u16 = 7179;

/// Default table and protocol of kernel-mode routes.
pub const DEFAULT_ROUTE_TABLE: u32 = 100;
pub const DEFAULT_ROUTE_PROTOCOL: u8 = 118;

/// The BGP speaker: announces each VIP with a usable backend as a host route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BgpConfig {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Seconds; 0 (no keepalives) or at least 3.
    pub hold_time: u16,
    /// Graceful restart as a restarting speaker, with this restart time; `None` = off.
    pub graceful_restart_time: Option<u16>,
    pub next_hop_v4: Option<Ipv4Addr>,
    pub next_hop_v6: Option<Ipv6Addr>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<[u32; 3]>,
    /// On SIGTERM: announce with GRACEFUL_SHUTDOWN this long before withdrawing.
    #[serde(serialize_with = "seconds")]
    pub drain_time: Duration,
    /// Accept connections from configured peers on port 179 (always, when a peer is passive);
    /// a connection that collides with our own is resolved as RFC 4271 6.8 says.
    pub listen: bool,
    /// BFD timers of every session (peers with `bfd` on); a reload changes them live.
    pub bfd_timers: crate::bfd::Timers,
    pub peers: Vec<BgpPeerConfig>,
}

/// BFD defaults: 300 ms x 3, the common router default (FRR's).
pub const DEFAULT_BFD_INTERVAL_MS: u64 = 300;
pub const DEFAULT_BFD_MULTIPLIER: u8 = 3;
/// BFD intervals accepted, in milliseconds.
pub const BFD_INTERVAL_RANGE_MS: std::ops::RangeInclusive<u64> = 10..=60_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BgpPeerConfig {
    pub address: IpAddr,
    pub asn: u32,
    pub port: u16,
    /// Wait for the peer to connect (vip listens on port 179) instead of connecting.
    pub passive: bool,
    /// When set, the peer's OPEN must carry this BGP identifier.
    pub router_id: Option<Ipv4Addr>,
    #[serde(serialize_with = "redacted")]
    pub password: Option<String>,
    pub hold_time: Option<u16>,
    /// A BFD session with this peer; the BGP session waits for it to be Up and goes down
    /// with it.
    pub bfd: bool,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<[u32; 3]>,
}

impl Config {
    /// The settings in which `new` differs from `self` that only a restart applies (map sizes,
    /// interfaces, listeners, the announcer's mode), by their names in the file. Everything
    /// else (VIPs, backends, health checks, sources, the conntrack insert limit, BGP peers
    /// and their settings) a reload applies.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        // Every field named: a new one must be sorted into live or restart here.
        let NodeConfig {
            role,
            interfaces,
            attach,
            source_v4: _,
            source_v6: _,
            pin_dir,
            metrics_address,
            control_socket,
            table_size,
            table_slots,
            conntrack_entries,
            conntrack_insert_limit: _,
            max_vips,
            max_backends,
        } = &self.node;
        let n = &new.node;
        [
            (*role != n.role, "node.role"),
            (*interfaces != n.interfaces, "node.interfaces"),
            (*attach != n.attach, "node.attach"),
            (*pin_dir != n.pin_dir, "node.pin_dir"),
            (
                *metrics_address != n.metrics_address,
                "node.metrics_address",
            ),
            (*control_socket != n.control_socket, "node.control_socket"),
            (*table_size != n.table_size, "node.table_size"),
            (*table_slots != n.table_slots, "node.table_slots"),
            (
                *conntrack_entries != n.conntrack_entries,
                "node.conntrack_entries",
            ),
            (*max_vips != n.max_vips, "node.max_vips"),
            (*max_backends != n.max_backends, "node.max_backends"),
            // Every BGP setting is applied live; only starting or ending vip's own speaker
            // is not.
            (self.bgp.is_some() != new.bgp.is_some(), "bgp"),
            (self.kernel_routes != new.kernel_routes, "announce"),
            (self.sync != new.sync, "sync"),
        ]
        .into_iter()
        .filter_map(|(differs, key)| differs.then_some(key))
        .collect()
    }

    /// Whether some backend is health-checked through the data path.
    pub fn has_datapath_checks(&self) -> bool {
        self.vips
            .iter()
            .flat_map(|v| &v.backends)
            .any(|b| b.health.via == CheckVia::Datapath && b.health.kind != CheckKind::None)
    }

    /// Addresses to put on `lo`: the VIPs this node load-balances or serves.
    pub fn loopback_addresses(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = match &self.backend {
            Some(b) => b.vips.clone(),
            None => self.vips.iter().map(|v| v.address).collect(),
        };
        v.sort();
        v.dedup();
        v
    }
}

/// A backend node: which encapsulated packets it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendRole {
    /// This backend's own addresses: the outer destinations it decapsulates.
    pub addresses: Vec<IpAddr>,
    /// The VIPs it serves: inner destinations it accepts, put on `lo`.
    pub vips: Vec<IpAddr>,
    /// UDP port of GUE packets to decapsulate; `None`: IP-in-IP only.
    pub gue_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    pub role: Role,
    pub interfaces: Vec<String>,
    pub attach: AttachMode,
    pub source_v4: Option<Ipv4Addr>,
    pub source_v6: Option<Ipv6Addr>,
    pub pin_dir: PathBuf,
    /// Prometheus metrics, `/healthz`, `/readyz` (GET only).
    pub metrics_address: SocketAddr,
    /// The control API's Unix socket (`vip-agent drain`, `backends`, `status`).
    pub control_socket: PathBuf,
    pub table_size: u32,
    pub table_slots: u32,
    /// Flows each conntrack table holds (one for IPv4 flows, one for IPv6).
    pub conntrack_entries: u32,
    /// New conntrack entries per second and CPU (0: no limit): beyond it new flows are
    /// forwarded by Maglev alone, so floods cannot churn conntrack faster.
    pub conntrack_insert_limit: u32,
    /// VIP capacity of the datapath's maps.
    pub max_vips: u32,
    /// Backend capacity, counting each backend of each VIP.
    pub max_backends: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VipConfig {
    pub address: IpAddr,
    pub protocol: Protocol,
    /// 0 = all ports.
    pub port: u16,
    pub encapsulation: Encapsulation,
    /// UDP destination port with `Encapsulation::Gue`.
    pub gue_port: u16,
    pub source_prefix: Option<IpNet>,
    pub hash: HashFields,
    #[serde(serialize_with = "seconds")]
    pub udp_idle_timeout: Duration,
    pub backends: Vec<BackendConfig>,
    /// Extra BGP communities and MED for this VIP's route.
    pub communities: Vec<u32>,
    pub large_communities: Vec<[u32; 3]>,
    pub med: Option<u32>,
}

impl VipConfig {
    pub fn name(&self) -> VipName {
        VipName {
            protocol: self.protocol,
            address: self.address,
            port: self.port,
        }
    }

    pub fn key(&self) -> VipKey {
        VipKey::new(self.address, self.protocol.number(), self.port)
    }
}

impl fmt::Display for VipConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.name().fmt(f)
    }
}

/// A VIP as people and metrics name it: `tcp/198.51.100.1:443` (`:*` for every port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VipName {
    pub protocol: Protocol,
    pub address: IpAddr,
    /// 0: every port.
    pub port: u16,
}

impl VipName {
    /// The name of the VIP a datapath key stands for (`None` for a key no config makes).
    pub fn of(key: &VipKey) -> Option<Self> {
        let protocol = match key.proto {
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            _ => return None,
        };
        Some(Self {
            protocol,
            address: vip_common::addr_from_bytes(&key.addr, key.family)?,
            port: u16::from_be_bytes(key.port),
        })
    }
}

impl fmt::Display for VipName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.protocol.name();
        match self.port {
            0 => write!(f, "{proto}/{}:*", self.address),
            port => write!(f, "{proto}/{}", SocketAddr::new(self.address, port)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    /// The VIP's health check with this backend's overrides.
    pub health: HealthCheck,
}

/// What a health check sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// No checks: the backend is always up.
    #[default]
    None,
    /// A TCP connection that completes.
    Tcp,
    /// `GET path` answered with the expected status.
    Http,
    /// `GET path` over TLS answered with the expected status. The certificate is not verified
    /// (backends are addressed by IP): the check proves the TLS service answers.
    Https,
    /// A UDP datagram answered with a datagram that contains the expected text.
    Udp,
}

/// Where health checks go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckVia {
    /// To the backend's own address: proves the host and service are up.
    #[default]
    Direct,
    /// To the VIP, encapsulated toward the backend like client traffic: also proves that the
    /// backend decapsulates, has the VIP on `lo` and serves it there.
    Datapath,
}

/// A backend health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub via: CheckVia,
    /// Port checked; the VIP's port by default.
    pub port: u16,
    #[serde(serialize_with = "seconds")]
    pub interval: Duration,
    #[serde(serialize_with = "seconds")]
    pub timeout: Duration,
    /// Successes in a row that bring a down backend back.
    pub rise: u32,
    /// Failures in a row that take a backend down.
    pub fall: u32,
    pub http_path: String,
    pub http_status: u16,
    /// HTTPS: the server name (SNI) to ask for; none by default.
    pub tls_server_name: Option<String>,
    pub udp_send: String,
    pub udp_expect: String,
}

impl BackendConfig {
    /// Weight in the Maglev table: draining and weight-0 backends take no new flows.
    pub fn table_weight(&self) -> u32 {
        match self.state {
            BackendState::Active => self.weight,
            BackendState::Draining => 0,
        }
    }
}

/// Largest backend weight: keeps a Maglev fill round bounded.
pub const MAX_WEIGHT: u32 = 1000;
