//! The file as written: what serde reads, with spans for locating errors.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;

use serde::Deserialize;
use toml::Spanned;
use vip_common::layout::{
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_TABLE_SIZE,
    DEFAULT_TABLE_SLOTS,
};

use super::{auto::AutoOr, types::*};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) node: RawNode,
    #[serde(default, rename = "vip")]
    pub(super) vips: Vec<Spanned<RawVip>>,
    pub(super) backend: Option<Spanned<RawBackendRole>>,
    pub(super) bgp: Option<Spanned<RawBgp>>,
    pub(super) announce: Option<Spanned<RawAnnounce>>,
    #[serde(default)]
    pub(super) egress: Vec<Spanned<RawEgress>>,
    pub(super) sync: Option<Spanned<RawSync>>,
}

/// Flow-state sharing with the other LB nodes of the tier (`[sync]`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSync {
    pub(super) listen: Spanned<SocketAddr>,
    pub(super) peers: Spanned<Vec<SocketAddr>>,
    pub(super) key: Option<Spanned<String>>,
    pub(super) key_file: Option<Spanned<PathBuf>>,
    #[serde(default = "default_sync_rate")]
    pub(super) max_entries_per_second: u32,
    /// Seconds.
    #[serde(default = "default_sync_fetch_timeout")]
    pub(super) fetch_timeout: u64,
    /// Seconds.
    #[serde(default = "default_sync_refresh")]
    pub(super) refresh: Spanned<u64>,
}

fn default_sync_rate() -> u32 {
    DEFAULT_SYNC_ENTRIES_PER_SECOND
}
fn default_sync_fetch_timeout() -> u64 {
    DEFAULT_SYNC_FETCH_TIMEOUT_SECS
}
fn default_sync_refresh() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_SYNC_REFRESH_SECS)
}

/// A VIP address that backends also use as their source (`[[egress]]`), the same section on
/// load balancers and backends.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    pub(super) vip: Spanned<IpAddr>,
    /// `"FIRST-LAST"`.
    pub(super) ports: Spanned<String>,
    pub(super) block_size: Spanned<u16>,
    /// Seconds a block rests after its backend left, before another backend may take it.
    #[serde(default = "default_egress_rest")]
    pub(super) rest: u64,
    #[serde(default, rename = "backend")]
    pub(super) backends: Vec<Spanned<RawEgressBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgressBackend {
    pub(super) address: Spanned<IpAddr>,
    pub(super) block: Spanned<u16>,
}

fn default_egress_rest() -> u64 {
    DEFAULT_EGRESS_REST_SECS
}

/// How VIPs reach the routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(super) enum AnnounceMode {
    /// vip's own BGP speaker (`[bgp]`).
    #[default]
    Bgp,
    /// Routes in a kernel table for a routing daemon on the node.
    Kernel,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    #[serde(default)]
    pub(super) mode: AnnounceMode,
    #[serde(default = "default_route_table")]
    pub(super) table: Spanned<u32>,
    #[serde(default = "default_route_protocol")]
    pub(super) protocol: Spanned<u8>,
    #[serde(default)]
    pub(super) drain_time: u64,
}

fn default_route_table() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_ROUTE_TABLE)
}
fn default_route_protocol() -> Spanned<u8> {
    Spanned::new(0..0, DEFAULT_ROUTE_PROTOCOL)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBgp {
    pub(super) asn: u32,
    pub(super) router_id: AutoOr<Ipv4Addr>,
    #[serde(default = "default_hold_time")]
    pub(super) hold_time: Spanned<u16>,
    #[serde(default = "default_zero_u16")]
    pub(super) graceful_restart_time: Spanned<u16>,
    pub(super) next_hop_v4: Option<Ipv4Addr>,
    pub(super) next_hop_v6: Option<AutoOr<Ipv6Addr>>,
    #[serde(default)]
    pub(super) communities: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) large_communities: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) drain_time: u64,
    #[serde(default)]
    pub(super) listen: bool,
    /// BFD with every peer (a peer's own `bfd` overrides).
    #[serde(default)]
    pub(super) bfd: bool,
    #[serde(default = "default_bfd_interval")]
    pub(super) bfd_min_tx: Spanned<u64>,
    #[serde(default = "default_bfd_interval")]
    pub(super) bfd_min_rx: Spanned<u64>,
    #[serde(default = "default_bfd_multiplier")]
    pub(super) bfd_multiplier: Spanned<u8>,
    #[serde(default, rename = "peer")]
    pub(super) peers: Vec<Spanned<RawPeer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) address: Spanned<IpAddr>,
    pub(super) asn: u32,
    #[serde(default = "default_bgp_port")]
    pub(super) port: u16,
    #[serde(default)]
    pub(super) passive: bool,
    pub(super) router_id: Option<Ipv4Addr>,
    pub(super) password: Option<Spanned<String>>,
    /// The password from a file (a mounted Secret); a trailing newline is not part of it.
    pub(super) password_file: Option<Spanned<PathBuf>>,
    pub(super) hold_time: Option<Spanned<u16>>,
    pub(super) bfd: Option<bool>,
    pub(super) med: Option<u32>,
    pub(super) local_pref: Option<u32>,
    #[serde(default)]
    pub(super) communities: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) large_communities: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackendRole {
    pub(super) addresses: Spanned<AutoOr<Vec<IpAddr>>>,
    #[serde(default)]
    pub(super) vips: Vec<IpAddr>,
    pub(super) gue_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    #[serde(default = "default_role")]
    pub(super) role: Spanned<Role>,
    pub(super) interfaces: Spanned<Vec<String>>,
    #[serde(default)]
    pub(super) attach: AttachMode,
    pub(super) source_v4: Option<AutoOr<Ipv4Addr>>,
    pub(super) source_v6: Option<AutoOr<Ipv6Addr>>,
    #[serde(default = "default_pin_dir")]
    pub(super) pin_dir: PathBuf,
    #[serde(default = "default_metrics_address")]
    pub(super) metrics_address: SocketAddr,
    #[serde(default = "default_control_socket")]
    pub(super) control_socket: PathBuf,
    #[serde(default = "default_table_size")]
    pub(super) table_size: Spanned<u32>,
    #[serde(default = "default_table_slots")]
    pub(super) table_slots: Spanned<u32>,
    #[serde(default = "default_conntrack_entries")]
    pub(super) conntrack_entries: u32,
    #[serde(default = "default_conntrack_insert_limit")]
    pub(super) conntrack_insert_limit: u32,
    #[serde(default = "default_max_vips")]
    pub(super) max_vips: Spanned<u32>,
    #[serde(default = "default_max_backends")]
    pub(super) max_backends: Spanned<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVip {
    pub(super) address: Spanned<IpAddr>,
    pub(super) protocol: Protocol,
    #[serde(default)]
    pub(super) port: u16,
    #[serde(default)]
    pub(super) encapsulation: Encapsulation,
    #[serde(default = "default_gue_port")]
    pub(super) gue_port: u16,
    pub(super) source_prefix: Option<Spanned<IpNet>>,
    #[serde(default)]
    pub(super) hash: HashFields,
    /// Seconds.
    #[serde(default = "default_udp_idle")]
    pub(super) udp_idle_timeout: u64,
    #[serde(default, rename = "backend")]
    pub(super) backends: Vec<Spanned<RawBackend>>,
    #[serde(default)]
    pub(super) communities: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) large_communities: Vec<Spanned<String>>,
    pub(super) med: Option<u32>,
    #[serde(default)]
    pub(super) health: RawHealth,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: Spanned<IpAddr>,
    #[serde(default = "default_weight")]
    pub(super) weight: Spanned<u32>,
    #[serde(default)]
    pub(super) state: BackendState,
    pub(super) health: Option<RawHealth>,
}

/// `[vip.health]` and `[vip.backend.health]`: every field optional, so a backend's table only
/// overrides what it names.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) check: Option<CheckKind>,
    pub(super) via: Option<CheckVia>,
    pub(super) port: Option<u16>,
    /// Seconds (fractions allowed).
    pub(super) interval: Option<f64>,
    pub(super) timeout: Option<f64>,
    pub(super) rise: Option<u32>,
    pub(super) fall: Option<u32>,
    pub(super) http_path: Option<String>,
    pub(super) http_status: Option<u16>,
    pub(super) tls_server_name: Option<String>,
    pub(super) udp_send: Option<String>,
    pub(super) udp_expect: Option<String>,
}

impl RawHealth {
    /// `self` with `over`'s fields where it has them.
    pub(super) fn merged(&self, over: &RawHealth) -> RawHealth {
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
    pub(super) fn resolve(&self, vip_port: u16) -> Result<HealthCheck, String> {
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
        let http_status = self.http_status.unwrap_or(200);
        if !(100..=599).contains(&http_status) {
            return Err(format!(
                "http_status {http_status}: an HTTP status, 100 to 599"
            ));
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
            http_status,
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
fn default_bfd_interval() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_BFD_INTERVAL_MS)
}
fn default_bfd_multiplier() -> Spanned<u8> {
    Spanned::new(0..0, DEFAULT_BFD_MULTIPLIER)
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
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT))
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
