//! The agent's configuration: one TOML file, accepted or rejected whole.
//!
//! Every error names the file, the line, the field and what is allowed, so an operator can fix
//! it without reading code. Parsing (`toml` + serde) catches types, unknown fields and bad enum
//! values; [`validate`] catches what only makes sense across fields (duplicate VIPs, backends of a
//! family without a source address, a table size that is not prime, more VIPs than slots).

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;
use vip_common::{
    IPPROTO_TCP, IPPROTO_UDP, VipKey,
    layout::{
        CAPACITY_LIMIT, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS,
        DEFAULT_TABLE_SIZE, DEFAULT_TABLE_SLOTS,
    },
    maglev::is_prime,
};

/// A configuration error, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted path of the field, e.g. `vip[2].backend[0].weight`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// How to attach XDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
}

/// Which fields of a flow pick its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HashFields {
    /// Addresses, ports and protocol.
    #[default]
    FiveTuple,
    /// Addresses and protocol: a client sticks to one backend (and fragments are forwarded).
    Addresses,
}

/// Encapsulation toward backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    /// No new flows; flows in conntrack continue.
    Draining,
}

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Load balancer: XDP load-balancing program, `[[vip]]` with backends.
    #[default]
    Lb,
    /// Backend: decapsulation program, the `[backend]` section.
    Backend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    pub vips: Vec<VipConfig>,
    /// Set when `node.role = "backend"`.
    pub backend: Option<BackendRole>,
    /// BGP speaker settings, when VIPs are announced.
    pub bgp: Option<BgpConfig>,
}

/// The BGP speaker: announces each VIP with a usable backend as a host route.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub drain_time: Duration,
    /// Accept connections from configured peers on port 179 (always, when a peer is passive);
    /// a connection that collides with our own is resolved as RFC 4271 6.8 says.
    pub listen: bool,
    pub peers: Vec<BgpPeerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpPeerConfig {
    pub address: IpAddr,
    pub asn: u32,
    pub port: u16,
    /// Wait for the peer to connect (vip listens on port 179) instead of connecting.
    pub passive: bool,
    /// When set, the peer's OPEN must carry this BGP identifier.
    pub router_id: Option<Ipv4Addr>,
    pub password: Option<String>,
    pub hold_time: Option<u16>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<[u32; 3]>,
}

impl Config {
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRole {
    /// This backend's own addresses: the outer destinations it decapsulates.
    pub addresses: Vec<IpAddr>,
    /// The VIPs it serves: inner destinations it accepts, put on `lo`.
    pub vips: Vec<IpAddr>,
    /// UDP port of GUE packets to decapsulate; `None`: IP-in-IP only.
    pub gue_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Entries of each conntrack map (one for IPv4 flows, one for IPv6).
    pub conntrack_entries: u32,
    /// New conntrack entries per second and CPU (0: no limit): beyond it new flows are
    /// forwarded by Maglev alone, so floods cannot churn the LRU faster.
    pub conntrack_insert_limit: u32,
    /// VIP capacity of the datapath's maps.
    pub max_vips: u32,
    /// Backend capacity, counting each backend of each VIP.
    pub max_backends: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub udp_idle_timeout: Duration,
    pub backends: Vec<BackendConfig>,
    /// Extra BGP communities and MED for this VIP's route.
    pub communities: Vec<u32>,
    pub large_communities: Vec<[u32; 3]>,
    pub med: Option<u32>,
}

impl VipConfig {
    pub fn key(&self) -> VipKey {
        VipKey::new(self.address, self.protocol.number(), self.port)
    }
}

impl fmt::Display for VipConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        match self.port {
            0 => write!(f, "{proto}/{}:*", self.address),
            port => write!(f, "{proto}/{}", SocketAddr::new(self.address, port)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    /// The VIP's health check with this backend's overrides.
    pub health: HealthCheck,
}

/// What a health check sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub via: CheckVia,
    /// Port checked; the VIP's port by default.
    pub port: u16,
    pub interval: Duration,
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

// ---- The file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    #[serde(default, rename = "vip")]
    vips: Vec<Spanned<RawVip>>,
    backend: Option<Spanned<RawBackendRole>>,
    bgp: Option<Spanned<RawBgp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBgp {
    asn: u32,
    router_id: Ipv4Addr,
    #[serde(default = "default_hold_time")]
    hold_time: Spanned<u16>,
    #[serde(default = "default_zero_u16")]
    graceful_restart_time: Spanned<u16>,
    next_hop_v4: Option<Ipv4Addr>,
    next_hop_v6: Option<Ipv6Addr>,
    #[serde(default)]
    communities: Vec<Spanned<String>>,
    #[serde(default)]
    large_communities: Vec<Spanned<String>>,
    #[serde(default)]
    drain_time: u64,
    #[serde(default)]
    listen: bool,
    #[serde(default, rename = "peer")]
    peers: Vec<Spanned<RawPeer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    address: Spanned<IpAddr>,
    asn: u32,
    #[serde(default = "default_bgp_port")]
    port: u16,
    #[serde(default)]
    passive: bool,
    router_id: Option<Ipv4Addr>,
    password: Option<Spanned<String>>,
    hold_time: Option<Spanned<u16>>,
    med: Option<u32>,
    local_pref: Option<u32>,
    #[serde(default)]
    communities: Vec<Spanned<String>>,
    #[serde(default)]
    large_communities: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendRole {
    addresses: Spanned<Vec<IpAddr>>,
    #[serde(default)]
    vips: Vec<IpAddr>,
    gue_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default = "default_role")]
    role: Spanned<Role>,
    interfaces: Spanned<Vec<String>>,
    #[serde(default)]
    attach: AttachMode,
    source_v4: Option<Ipv4Addr>,
    source_v6: Option<Ipv6Addr>,
    #[serde(default = "default_pin_dir")]
    pin_dir: PathBuf,
    #[serde(default = "default_metrics_address")]
    metrics_address: SocketAddr,
    #[serde(default = "default_control_socket")]
    control_socket: PathBuf,
    #[serde(default = "default_table_size")]
    table_size: Spanned<u32>,
    #[serde(default = "default_table_slots")]
    table_slots: Spanned<u32>,
    #[serde(default = "default_conntrack_entries")]
    conntrack_entries: u32,
    #[serde(default = "default_conntrack_insert_limit")]
    conntrack_insert_limit: u32,
    #[serde(default = "default_max_vips")]
    max_vips: Spanned<u32>,
    #[serde(default = "default_max_backends")]
    max_backends: Spanned<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: Spanned<IpAddr>,
    protocol: Protocol,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    encapsulation: Encapsulation,
    #[serde(default = "default_gue_port")]
    gue_port: u16,
    source_prefix: Option<Spanned<IpNet>>,
    #[serde(default)]
    hash: HashFields,
    /// Seconds.
    #[serde(default = "default_udp_idle")]
    udp_idle_timeout: u64,
    #[serde(default, rename = "backend")]
    backends: Vec<Spanned<RawBackend>>,
    #[serde(default)]
    communities: Vec<Spanned<String>>,
    #[serde(default)]
    large_communities: Vec<Spanned<String>>,
    med: Option<u32>,
    #[serde(default)]
    health: RawHealth,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<IpAddr>,
    #[serde(default = "default_weight")]
    weight: Spanned<u32>,
    #[serde(default)]
    state: BackendState,
    health: Option<RawHealth>,
}

/// `[vip.health]` and `[vip.backend.health]`: every field optional, so a backend's table only
/// overrides what it names.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<CheckKind>,
    via: Option<CheckVia>,
    port: Option<u16>,
    /// Seconds (fractions allowed).
    interval: Option<f64>,
    timeout: Option<f64>,
    rise: Option<u32>,
    fall: Option<u32>,
    http_path: Option<String>,
    http_status: Option<u16>,
    tls_server_name: Option<String>,
    udp_send: Option<String>,
    udp_expect: Option<String>,
}

impl RawHealth {
    /// `self` with `over`'s fields where it has them.
    fn merged(&self, over: &RawHealth) -> RawHealth {
        RawHealth {
            check: over.check.or(self.check),
            via: over.via.or(self.via),
            port: over.port.or(self.port),
            interval: over.interval.or(self.interval),
            timeout: over.timeout.or(self.timeout),
            rise: over.rise.or(self.rise),
            fall: over.fall.or(self.fall),
            http_path: over.http_path.clone().or_else(|| self.http_path.clone()),
            http_status: over.http_status.or(self.http_status),
            tls_server_name: over
                .tls_server_name
                .clone()
                .or_else(|| self.tls_server_name.clone()),
            udp_send: over.udp_send.clone().or_else(|| self.udp_send.clone()),
            udp_expect: over.udp_expect.clone().or_else(|| self.udp_expect.clone()),
        }
    }

    /// The check, with defaults, or what is wrong with it.
    fn resolve(&self, vip_port: u16) -> Result<HealthCheck, String> {
        let seconds = |v: Option<f64>, default: f64, what: &str| -> Result<Duration, String> {
            let v = v.unwrap_or(default);
            if !(0.05..=3600.0).contains(&v) {
                return Err(format!("{what} = {v}: use 0.05 to 3600 seconds"));
            }
            Ok(Duration::from_secs_f64(v))
        };
        let kind = self.check.unwrap_or_default();
        let interval = seconds(self.interval, 2.0, "interval")?;
        let timeout = seconds(self.timeout, 1.0, "timeout")?;
        if timeout > interval {
            return Err(format!(
                "timeout {timeout:?} is longer than interval {interval:?}"
            ));
        }
        let port = self.port.unwrap_or(vip_port);
        if kind != CheckKind::None && port == 0 {
            return Err("an all-ports VIP needs `port` for its health check".into());
        }
        let rise = self.rise.unwrap_or(2);
        let fall = self.fall.unwrap_or(3);
        if !(1..=100).contains(&rise) || !(1..=100).contains(&fall) {
            return Err(format!("rise {rise} and fall {fall}: use 1 to 100"));
        }
        let http_path = self.http_path.clone().unwrap_or_else(|| "/".into());
        if !http_path.starts_with('/') || http_path.contains(char::is_whitespace) {
            return Err(format!(
                "http_path {http_path:?}: an absolute path without spaces"
            ));
        }
        let tls_server_name = self.tls_server_name.clone();
        if let Some(name) = &tls_server_name
            && rustls::pki_types::DnsName::try_from(name.as_str()).is_err()
        {
            return Err(format!("tls_server_name {name:?}: a DNS name"));
        }
        Ok(HealthCheck {
            kind,
            via: self.via.unwrap_or_default(),
            port,
            interval,
            timeout,
            rise,
            fall,
            http_path,
            http_status: self.http_status.unwrap_or(200),
            tls_server_name,
            udp_send: self.udp_send.clone().unwrap_or_else(|| "ping".into()),
            udp_expect: self.udp_expect.clone().unwrap_or_default(),
        })
    }
}

fn default_gue_port() -> u16 {
    DEFAULT_GUE_PORT
}
fn default_zero_u16() -> Spanned<u16> {
    Spanned::new(0..0, 0)
}
fn default_hold_time() -> Spanned<u16> {
    Spanned::new(0..0, 9)
}
fn default_bgp_port() -> u16 {
    179
}
fn default_role() -> Spanned<Role> {
    Spanned::new(0..0, Role::Lb)
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/vip")
}
fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9100))
}
fn default_table_size() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_TABLE_SIZE)
}
/// Per CPU: far above what real clients open, far below what a flood sends.
fn default_conntrack_insert_limit() -> u32 {
    200_000
}
fn default_max_vips() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_MAX_VIPS)
}
fn default_max_backends() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_MAX_BACKENDS)
}
fn default_table_slots() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_TABLE_SLOTS)
}
fn default_conntrack_entries() -> u32 {
    DEFAULT_CONNTRACK_ENTRIES
}
fn default_udp_idle() -> u64 {
    30
}
fn default_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

/// `ASN:VALUE` (RFC 1997), both 16-bit; or a well-known name.
fn parse_community(s: &str) -> Result<u32, String> {
    match s {
        "graceful-shutdown" => return Ok(0xffff_0000),
        "no-export" => return Ok(0xffff_ff01),
        "no-advertise" => return Ok(0xffff_ff02),
        _ => {}
    }
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not ASN:VALUE"))?;
    let a: u16 = a
        .parse()
        .map_err(|_| format!("{s:?}: {a} is not 0..65535"))?;
    let b: u16 = b
        .parse()
        .map_err(|_| format!("{s:?}: {b} is not 0..65535"))?;
    Ok((u32::from(a) << 16) | u32::from(b))
}

/// `GLOBAL:LOCAL1:LOCAL2` (RFC 8092), three 32-bit numbers.
fn parse_large_community(s: &str) -> Result<[u32; 3], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 3 {
        return Err(format!("{s:?} is not GLOBAL:LOCAL1:LOCAL2"));
    }
    let mut out = [0u32; 3];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p
            .parse()
            .map_err(|_| format!("{s:?}: {p} is not a 32-bit number"))?;
    }
    Ok(out)
}

/// Largest backend weight: keeps a Maglev fill round bounded.
pub const MAX_WEIGHT: u32 = 1000;

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and validates config text (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: e.span().map(|s| line_of(text, &s)),
        field: e
            .span()
            .map_or_else(String::new, |s| field_at(text, s.start)),
        message: e.message().trim().to_owned(),
    })?;
    validate(path, text, raw)
}

/// The dotted path of the field at byte `offset`, e.g. `vip[1].backend[0].weight`: the key on
/// that line inside the table whose header precedes it (array tables counted).
fn field_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or_default().trim();
    let key = match line.split_once('=') {
        Some((k, _)) if !line.starts_with('[') => k.trim(),
        _ => "",
    };
    // Index of each array table seen so far; a new parent resets its children.
    let mut path: Vec<(String, Option<usize>)> = Vec::new();
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for header in text[..line_start].lines().map(str::trim) {
        let (name, array) =
            if let Some(n) = header.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
                (n.trim(), true)
            } else if let Some(n) = header.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                (n.trim(), false)
            } else {
                continue;
            };
        let index = array.then(|| {
            let c = counts.entry(name.to_owned()).or_insert(0);
            *c += 1;
            *c - 1
        });
        counts.retain(|k, _| !k.starts_with(&format!("{name}.")));
        path = name
            .split('.')
            .map(|part| (part.to_owned(), None))
            .collect();
        if let Some(last) = path.last_mut() {
            last.1 = index;
        }
        // Parents of a nested array table take their current index.
        let parts: Vec<&str> = name.split('.').collect();
        for depth in 1..parts.len() {
            let parent = parts[..depth].join(".");
            if let Some(&c) = counts.get(&parent) {
                path[depth - 1].1 = Some(c - 1);
            }
        }
    }
    let mut out: Vec<String> = path
        .into_iter()
        .map(|(name, index)| match index {
            Some(i) => format!("{name}[{i}]"),
            None => name,
        })
        .collect();
    if !key.is_empty() {
        out.push(key.to_owned());
    }
    out.join(".")
}

fn line_of(text: &str, span: &Range<usize>) -> usize {
    text[..span.start.min(text.len())].matches('\n').count() + 1
}

type Located<'a> = dyn Fn(&Range<usize>, String, String) -> ConfigError + 'a;

fn communities_of(
    communities: &[Spanned<String>],
    large: &[Spanned<String>],
    err: &dyn Fn(&Range<usize>, &str, String) -> ConfigError,
) -> Result<(Vec<u32>, Vec<[u32; 3]>), ConfigError> {
    let standard = communities
        .iter()
        .map(|c| parse_community(c.get_ref()).map_err(|m| err(&c.span(), "communities", m)))
        .collect::<Result<_, _>>()?;
    let large = large
        .iter()
        .map(|c| {
            parse_large_community(c.get_ref()).map_err(|m| err(&c.span(), "large_communities", m))
        })
        .collect::<Result<_, _>>()?;
    Ok((standard, large))
}

fn validate_bgp(b: RawBgp, err: &Located) -> Result<BgpConfig, ConfigError> {
    let hold = *b.hold_time.get_ref();
    if hold == 1 || hold == 2 {
        return Err(err(
            &b.hold_time.span(),
            "bgp.hold_time".into(),
            format!("{hold}: use 0 (no keepalives) or 3 and more seconds"),
        ));
    }
    let gr = *b.graceful_restart_time.get_ref();
    if gr > 4095 {
        return Err(err(
            &b.graceful_restart_time.span(),
            "bgp.graceful_restart_time".into(),
            format!("{gr}: at most 4095 seconds (0 = off)"),
        ));
    }
    if b.asn == 0 {
        return Err(err(
            &(0..0),
            "bgp.asn".into(),
            "0 is not a valid ASN".into(),
        ));
    }
    if b.router_id.is_unspecified() {
        return Err(err(
            &(0..0),
            "bgp.router_id".into(),
            "0.0.0.0 is not a valid router ID".into(),
        ));
    }
    let (communities, large_communities) =
        communities_of(&b.communities, &b.large_communities, &|span, which, m| {
            err(span, format!("bgp.{which}"), m)
        })?;
    let mut peers = Vec::new();
    let mut seen = HashSet::new();
    for (i, p) in b.peers.into_iter().enumerate() {
        let p = p.into_inner();
        let field = |f: &str| format!("bgp.peer[{i}].{f}");
        let address = *p.address.get_ref();
        if !seen.insert(address) {
            return Err(err(
                &p.address.span(),
                field("address"),
                format!("peer {address} is configured twice"),
            ));
        }
        if let Some(h) = &p.hold_time
            && (*h.get_ref() == 1 || *h.get_ref() == 2)
        {
            return Err(err(
                &h.span(),
                field("hold_time"),
                "use 0 or 3 and more seconds".into(),
            ));
        }
        if let Some(pw) = &p.password
            && pw.get_ref().len() > 80
        {
            return Err(err(
                &pw.span(),
                field("password"),
                "TCP MD5 keys are at most 80 bytes".into(),
            ));
        }
        let (pc, plc) = communities_of(&p.communities, &p.large_communities, &|span, which, m| {
            err(span, field(which), m)
        })?;
        peers.push(BgpPeerConfig {
            address,
            asn: p.asn,
            port: p.port,
            passive: p.passive,
            router_id: p.router_id,
            password: p.password.map(|s| s.into_inner()),
            hold_time: p.hold_time.map(|h| h.into_inner()),
            med: p.med,
            local_pref: p.local_pref,
            communities: pc,
            large_communities: plc,
        });
    }
    Ok(BgpConfig {
        asn: b.asn,
        router_id: b.router_id,
        hold_time: hold,
        graceful_restart_time: (gr > 0).then_some(gr),
        next_hop_v4: b.next_hop_v4,
        next_hop_v6: b.next_hop_v6,
        communities,
        large_communities,
        drain_time: Duration::from_secs(b.drain_time),
        listen: b.listen || peers.iter().any(|p| p.passive),
        peers,
    })
}

fn validate(path: &Path, text: &str, raw: RawConfig) -> Result<Config, ConfigError> {
    let err = |span: &Range<usize>, field: String, message: String| ConfigError {
        file: path.to_owned(),
        line: (span.end > 0).then(|| line_of(text, span)),
        field,
        message,
    };
    let node = raw.node;
    let role = *node.role.get_ref();
    let backend = match (role, raw.backend) {
        (Role::Backend, None) => {
            return Err(err(
                &node.role.span(),
                "backend".into(),
                "role \"backend\" needs a [backend] section with `addresses` (and `vips`)".into(),
            ));
        }
        (Role::Lb, Some(b)) => {
            return Err(err(
                &b.span(),
                "backend".into(),
                "a [backend] section needs node.role = \"backend\"".into(),
            ));
        }
        (Role::Backend, Some(b)) => {
            let b = b.into_inner();
            if b.addresses.get_ref().is_empty() {
                return Err(err(
                    &b.addresses.span(),
                    "backend.addresses".into(),
                    "list this backend's own addresses (the outer destinations it accepts)".into(),
                ));
            }
            if let Some(v) = raw.vips.first() {
                return Err(err(
                    &v.span(),
                    "vip".into(),
                    "a backend lists the VIPs it serves in backend.vips, not as [[vip]]".into(),
                ));
            }
            Some(BackendRole {
                addresses: b.addresses.into_inner(),
                vips: b.vips,
                gue_port: b.gue_port.filter(|p| *p != 0),
            })
        }
        (Role::Lb, None) => None,
    };
    if node.interfaces.get_ref().is_empty() {
        return Err(err(
            &node.interfaces.span(),
            "node.interfaces".into(),
            "list at least one interface to attach to, e.g. [\"eth0\"]".into(),
        ));
    }
    let table_size = *node.table_size.get_ref();
    if !is_prime(table_size) || table_size < 7 {
        return Err(err(
            &node.table_size.span(),
            "node.table_size".into(),
            format!("{table_size} is not a prime number of at least 7 (e.g. 65537, 16381, 251)"),
        ));
    }
    let table_slots = *node.table_slots.get_ref();
    if raw.vips.len() as u64 >= u64::from(table_slots) {
        return Err(err(
            &node.table_slots.span(),
            "node.table_slots".into(),
            format!(
                "{table_slots} Maglev table slots cannot hold {} VIPs plus a spare for switching \
                 tables: set at least {}",
                raw.vips.len(),
                raw.vips.len() + 1
            ),
        ));
    }
    for (capacity, name) in [
        (&node.max_vips, "max_vips"),
        (&node.max_backends, "max_backends"),
    ] {
        if !(1..=CAPACITY_LIMIT).contains(capacity.get_ref()) {
            return Err(err(
                &capacity.span(),
                format!("node.{name}"),
                format!("{}: use 1 to {CAPACITY_LIMIT}", capacity.get_ref()),
            ));
        }
    }
    let max_vips = *node.max_vips.get_ref();
    if raw.vips.len() > max_vips as usize {
        return Err(err(
            &node.max_vips.span(),
            "node.max_vips".into(),
            format!(
                "{} VIPs, but max_vips is {max_vips}: raise it",
                raw.vips.len()
            ),
        ));
    }
    let max_backends = *node.max_backends.get_ref();
    let backend_entries: usize = raw.vips.iter().map(|v| v.get_ref().backends.len()).sum();
    if backend_entries > max_backends as usize {
        return Err(err(
            &node.max_backends.span(),
            "node.max_backends".into(),
            format!(
                "{backend_entries} backends over all VIPs (each backend of each VIP counts), but \
                 max_backends is {max_backends}: raise it"
            ),
        ));
    }

    let mut vips = Vec::new();
    let mut keys = HashSet::new();
    for (i, spanned) in raw.vips.into_iter().enumerate() {
        let vip_span = spanned.span();
        let v = spanned.into_inner();
        let address = *v.address.get_ref();
        let field = |f: &str| format!("vip[{i}].{f}");
        let key = (address, v.protocol, v.port);
        if !keys.insert(key) {
            return Err(err(
                &v.address.span(),
                field("address"),
                format!(
                    "{address} {:?} port {} is configured twice",
                    v.protocol, v.port
                ),
            ));
        }
        if address.is_unspecified() || address.is_multicast() {
            return Err(err(
                &v.address.span(),
                field("address"),
                format!("{address} cannot be a VIP: use a unicast address"),
            ));
        }
        let mut backends = Vec::new();
        let mut seen = HashSet::new();
        for (j, b) in v.backends.iter().enumerate() {
            let b = b.get_ref();
            let baddr = *b.address.get_ref();
            let bfield = |f: &str| format!("vip[{i}].backend[{j}].{f}");
            if !seen.insert(baddr) {
                return Err(err(
                    &b.address.span(),
                    bfield("address"),
                    format!("backend {baddr} is listed twice for this VIP"),
                ));
            }
            let weight = *b.weight.get_ref();
            if weight > MAX_WEIGHT {
                return Err(err(
                    &b.weight.span(),
                    bfield("weight"),
                    format!("{weight} is above the maximum weight {MAX_WEIGHT} (0 = drain)"),
                ));
            }
            let source_missing = match baddr {
                IpAddr::V4(_) => node.source_v4.is_none(),
                IpAddr::V6(_) => node.source_v6.is_none(),
            };
            if source_missing && v.source_prefix.is_none() {
                let which = if baddr.is_ipv4() {
                    "source_v4"
                } else {
                    "source_v6"
                };
                return Err(err(
                    &b.address.span(),
                    bfield("address"),
                    format!(
                        "backend {baddr} needs an outer source address: set node.{which} \
                         (or a vip source_prefix of that family)"
                    ),
                ));
            }
            let health = v
                .health
                .merged(b.health.as_ref().unwrap_or(&RawHealth::default()))
                .resolve(v.port)
                .map_err(|m| {
                    let f = if b.health.is_some() {
                        bfield("health")
                    } else {
                        field("health")
                    };
                    err(&b.address.span(), f, m)
                })?;
            if health.via == CheckVia::Datapath && health.kind != CheckKind::None {
                let problem = if baddr.is_ipv4() != address.is_ipv4() {
                    Some("the backend's address family must match the VIP's".to_string())
                } else if baddr.is_ipv6() && v.encapsulation == Encapsulation::Gue {
                    Some("GUE VIPs are checked through the data path over IPv4 only".into())
                } else if source_missing {
                    let which = if baddr.is_ipv4() {
                        "source_v4"
                    } else {
                        "source_v6"
                    };
                    Some(format!("the probes come from node.{which}: set it"))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    let f = if b.health.is_some() {
                        bfield("health.via")
                    } else {
                        field("health.via")
                    };
                    return Err(err(
                        &b.address.span(),
                        f,
                        format!("via = \"datapath\" with backend {baddr}: {problem}"),
                    ));
                }
            }
            backends.push(BackendConfig {
                address: baddr,
                weight,
                state: b.state,
                health,
            });
        }
        if let Some(prefix) = &v.source_prefix {
            let p = *prefix.get_ref();
            let wrong_family = v
                .backends
                .iter()
                .any(|b| b.get_ref().address.get_ref().is_ipv4() != p.addr().is_ipv4());
            if wrong_family {
                return Err(err(
                    &prefix.span(),
                    field("source_prefix"),
                    format!("{p}: the prefix's family must match the VIP's backends"),
                ));
            }
            if let IpNet::V6(p6) = p
                && p6.prefix_len() < 96
            {
                return Err(err(
                    &prefix.span(),
                    field("source_prefix"),
                    format!(
                        "{p}: IPv6 source prefixes must be /96 or longer (entropy goes in the last 32 bits)"
                    ),
                ));
            }
        }
        if v.udp_idle_timeout == 0 {
            return Err(err(
                &vip_span,
                field("udp_idle_timeout"),
                "must be at least 1 (seconds)".into(),
            ));
        }
        let (communities, large_communities) = communities_of(
            &v.communities,
            &v.large_communities,
            &|span, which, message| err(span, field(which), message),
        )?;
        vips.push(VipConfig {
            communities,
            large_communities,
            med: v.med,
            address,
            protocol: v.protocol,
            port: v.port,
            encapsulation: v.encapsulation,
            gue_port: v.gue_port,
            source_prefix: v.source_prefix.map(|p| p.into_inner().trunc()),
            hash: v.hash,
            udp_idle_timeout: Duration::from_secs(v.udp_idle_timeout),
            backends,
        });
    }
    let bgp = match raw.bgp {
        None => None,
        Some(b) if role == Role::Backend => {
            return Err(err(
                &b.span(),
                "bgp".into(),
                "backends do not announce VIPs: remove [bgp]".into(),
            ));
        }
        Some(b) => Some(validate_bgp(b.into_inner(), &err)?),
    };
    Ok(Config {
        bgp,
        backend,
        node: NodeConfig {
            role,
            interfaces: node.interfaces.into_inner(),
            attach: node.attach,
            source_v4: node.source_v4,
            source_v6: node.source_v6,
            pin_dir: node.pin_dir,
            metrics_address: node.metrics_address,
            control_socket: node.control_socket,
            table_size,
            table_slots,
            conntrack_entries: node.conntrack_entries,
            conntrack_insert_limit: node.conntrack_insert_limit,
            max_vips,
            max_backends,
        },
        vips,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
interfaces = ["eth0"]
source_v4 = "198.18.0.2"
table_size = 251

[[vip]]
address = "198.19.0.1"
protocol = "tcp"
port = 80

[[vip.backend]]
address = "198.18.1.1"

[[vip.backend]]
address = "198.18.1.2"
weight = 2
state = "draining"
"#;

    fn error(text: &str) -> ConfigError {
        parse(Path::new("vip.toml"), text).expect_err("config must be rejected")
    }

    #[test]
    fn good_config_with_defaults() {
        let c = parse(Path::new("vip.toml"), GOOD).unwrap();
        assert_eq!(c.node.attach, AttachMode::Auto);
        assert_eq!(c.node.pin_dir, PathBuf::from("/sys/fs/bpf/vip"));
        assert_eq!(c.vips[0].hash, HashFields::FiveTuple);
        assert_eq!(c.vips[0].backends[0].weight, 1);
        assert_eq!(c.vips[0].backends[1].table_weight(), 0);
        assert_eq!(c.vips[0].to_string(), "tcp/198.19.0.1:80");
    }

    #[test]
    fn errors_name_file_line_field_and_what_is_allowed() {
        let e = error(&GOOD.replace("weight = 2", "weight = 5000"));
        assert_eq!(e.line, Some(17));
        assert_eq!(e.field, "vip[0].backend[1].weight");
        assert!(
            e.to_string()
                .starts_with("vip.toml:17: vip[0].backend[1].weight: 5000"),
            "{e}"
        );

        let e = error(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
        assert_eq!(e.line, Some(9));
        assert_eq!(e.field, "vip[0].protocol");
        assert!(
            e.message.contains("tcp") && e.message.contains("udp"),
            "{e}"
        );

        let e = error(&GOOD.replace("state = \"draining\"", "state = \"gone\""));
        assert_eq!(e.field, "vip[0].backend[1].state");

        let e = error(&GOOD.replace("table_size = 251", "table_size = 250"));
        assert_eq!((e.line, e.field.as_str()), (Some(5), "node.table_size"));

        let e = error(&GOOD.replace("address = \"198.18.1.2\"", "address = \"198.18.1.1\""));
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(16), "vip[0].backend[1].address")
        );

        let e = error(&GOOD.replace("source_v4 = \"198.18.0.2\"\n", ""));
        assert!(e.message.contains("node.source_v4"), "{e}");

        let e = error(&GOOD.replace("port = 80", "port = 80\ncolour = \"blue\""));
        assert!(e.message.contains("unknown field `colour`"), "{e}");

        let e = error(&GOOD.replace("address = \"198.19.0.1\"", "address = \"198.19.0.300\""));
        assert_eq!(e.line, Some(8));
    }

    #[test]
    fn health_checks_merge_vip_and_backend_settings() {
        let text = GOOD.replace(
            "port = 80\n",
            "port = 80\n[vip.health]\ncheck = \"http\"\ninterval = 0.5\ntimeout = 0.2\nhttp_path = \"/ok\"\n",
        )
        .replace("state = \"draining\"\n", "state = \"draining\"\n[vip.backend.health]\nfall = 5\nport = 8080\n");
        let c = parse(Path::new("h.toml"), &text).unwrap();
        let (a, b) = (&c.vips[0].backends[0].health, &c.vips[0].backends[1].health);
        assert_eq!(
            (a.kind, a.port, a.fall, a.rise),
            (CheckKind::Http, 80, 3, 2)
        );
        assert_eq!(a.interval, Duration::from_millis(500));
        assert_eq!(
            (b.kind, b.port, b.fall, b.http_path.as_str()),
            (CheckKind::Http, 8080, 5, "/ok")
        );
        let e = error(&text.replace("timeout = 0.2", "timeout = 2"));
        assert!(e.message.contains("longer than interval"), "{e}");
    }

    #[test]
    fn backend_role() {
        let text = r#"
[node]
role = "backend"
interfaces = ["eth0"]

[backend]
addresses = ["198.18.1.1", "fd00:1::1"]
vips = ["198.19.0.1", "198.19.0.1", "fd00:19::1"]
"#;
        let c = parse(Path::new("b.toml"), text).unwrap();
        assert_eq!(c.node.role, Role::Backend);
        assert_eq!(c.backend.as_ref().unwrap().addresses.len(), 2);
        assert_eq!(c.loopback_addresses().len(), 2);

        let e = error(&text.replace("role = \"backend\"\n", ""));
        assert!(e.message.contains("node.role"), "{e}");
        let e = error(&text.replace("[backend]", "[backend]\nport = 1"));
        assert!(e.message.contains("unknown field `port`"), "{e}");
        let e = error(&format!(
            "{text}\n[[vip]]\naddress = \"198.19.0.1\"\nprotocol = \"tcp\"\n"
        ));
        assert!(e.message.contains("backend.vips"), "{e}");
    }

    #[test]
    fn duplicate_vip_is_rejected() {
        let twice =
            format!("{GOOD}\n[[vip]]\naddress = \"198.19.0.1\"\nprotocol = \"tcp\"\nport = 80\n");
        let e = error(&twice);
        assert!(e.message.contains("configured twice"), "{e}");
        assert_eq!(e.line, Some(21));
    }
}
