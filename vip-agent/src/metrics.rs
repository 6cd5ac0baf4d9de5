//! Prometheus metrics and health endpoints on the node's metrics address: `GET` only; the
//! controls are on the control socket.
//!
//! Datapath counters live in per-CPU maps and are read at scrape time, through their own
//! handles on the pinned maps, into a [`Snapshot`] with the runtime's published [`View`]; a
//! prometheus-client collector encodes it as constant metrics. A scrape never waits for the
//! runtime. `/healthz` answers while the agent runs; `/readyz` while the datapath is attached
//! and holds the running config.

use std::{collections::HashSet, fmt::Write as _, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};
use vip_common::{DatapathStats, DecapStats, Outcome, TrafficCounters};

use crate::{
    bfd,
    bgp::{self, Sessions, session::State},
    config::VipName,
    dataplane::{Census, Counters},
    view::{BlockState, CheckView, EgressBlockView, View},
};

/// Counters read from the maps and the agent for one scrape.
#[derive(Debug, Default, Clone)]
pub(crate) struct Snapshot {
    pub datapath: Option<DatapathStats>,
    pub decap: Option<DecapStats>,
    /// (VIP, traffic).
    pub vips: Vec<(VipName, TrafficCounters)>,
    /// ((VIP, backend address), traffic).
    pub backends: Vec<((VipName, String), TrafficCounters)>,
    /// The conntrack tables counted (at most every [`CENSUS_INTERVAL`]).
    pub conntrack: Option<Census>,
    /// ((VIP, backend address), conntrack entries that send to it).
    pub backend_flows: Vec<((VipName, String), u64)>,
    /// Egress blocks with an owner or resting, and the traffic to their owner (load balancer).
    pub egress: Vec<(EgressBlockView, Option<TrafficCounters>)>,
    /// Flow-state sharing, with `[sync]`.
    pub sync: Option<crate::sync::Stats>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// (peer, session).
    pub bgp: Vec<(String, bgp::session::Status)>,
    /// (peer, BFD session).
    pub bfd: Vec<(String, bfd::Status)>,
    /// (reason, received BFD packets refused for it); empty without BFD.
    pub bfd_refused: Vec<(String, u64)>,
    /// ((VIP, backend), up, last check latency in seconds, state changes).
    pub health: Vec<((VipName, String), CheckView)>,
    pub ready: bool,
    pub node_drained: bool,
    /// (interface, how it is attached).
    pub attached: Vec<(String, String)>,
    /// (seconds since the epoch, applied) of the last reload.
    pub last_reload: Option<(f64, bool)>,
    /// (VIP, forwardable).
    pub forwardable: Vec<(VipName, bool)>,
}

/// Where a scrape's numbers come from.
pub(crate) struct MetricsSources {
    pub view: watch::Receiver<View>,
    pub counters: Arc<Counters>,
    pub sessions: Sessions,
    /// The last conntrack census and when it was taken.
    pub census: std::sync::Mutex<Option<(std::time::Instant, Census)>>,
    /// Flow-state sharing's counters, with `[sync]`.
    pub sync: Option<crate::sync::Counters>,
}

/// How old a conntrack census may be: counting walks both maps (a syscall per entry), so
/// scrapes more frequent than this share one walk.
pub(crate) const CENSUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl MetricsSources {
    /// The conntrack census, taken again when older than [`CENSUS_INTERVAL`].
    fn census(&self) -> Option<Census> {
        let mut cached = self.census.lock().ok()?;
        let fresh = cached
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < CENSUS_INTERVAL);
        if !fresh {
            *cached = Some((std::time::Instant::now(), self.counters.conntrack_census()?));
        }
        cached.as_ref().map(|(_, c)| c.clone())
    }

    /// Reads everything a scrape shows.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let view = self.view.borrow().clone();
        let mut s = Snapshot {
            reloads_ok: view.reloads_ok,
            reloads_failed: view.reloads_failed,
            ready: view.ready,
            node_drained: view.node_drained,
            attached: view
                .attached
                .iter()
                .map(|a| {
                    let (iface, how) = a.split_once(": ").unwrap_or((a, ""));
                    (iface.to_owned(), how.to_owned())
                })
                .collect(),
            last_reload: view.last_reload,
            forwardable: view.forwardable.clone(),
            datapath: self.counters.datapath(),
            decap: self.counters.decap(),
            ..Default::default()
        };
        s.conntrack = self.census();
        for account in &view.accounts {
            let mut total = account.retired;
            for (addr, id) in &account.backends {
                let traffic = self.counters.backend_traffic(*id).unwrap_or_default();
                total += traffic;
                s.backends.push(((account.name, addr.to_string()), traffic));
                if let Some(c) = &s.conntrack {
                    let flows = c.by_backend.get(id).copied().unwrap_or(0);
                    s.backend_flows
                        .push(((account.name, addr.to_string()), flows));
                }
            }
            s.vips.push((account.name, total));
        }
        s.sync = self.sync.as_ref().map(crate::sync::Counters::snapshot);
        s.egress = view
            .egress
            .iter()
            .map(|b| {
                let traffic = b
                    .backend_id
                    .and_then(|id| self.counters.backend_traffic(id).ok());
                (b.clone(), traffic)
            })
            .collect();
        s.health = view
            .backends
            .iter()
            .filter_map(|b| Some(((b.vip, b.address.to_string()), b.check.clone()?)))
            .collect();
        s.bgp = self
            .sessions
            .status()
            .into_iter()
            .map(|(peer, st)| (peer.to_string(), st))
            .collect();
        s.bfd = self
            .sessions
            .bfd()
            .into_iter()
            .map(|(peer, st)| (peer.to_string(), st))
            .collect();
        s.bfd_refused = self
            .sessions
            .bfd_refusals()
            .map(|r| owned(&r))
            .unwrap_or_default();
        s
    }
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let metric = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

/// A gauge without labels.
fn gauge<N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result {
    let metric = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// A VIP's labels: `vip` (its address), `protocol`, `port` (0: every port).
fn vip_labels(vip: &VipName) -> Vec<(String, String)> {
    vec![
        ("vip".to_owned(), vip.address.to_string()),
        ("protocol".to_owned(), vip.protocol.name().to_owned()),
        ("port".to_owned(), vip.port.to_string()),
    ]
}

/// A backend of a VIP's labels: the VIP's and `backend`.
fn backend_labels(vip: &VipName, backend: &str) -> Vec<(String, String)> {
    let mut labels = vip_labels(vip);
    labels.push(("backend".to_owned(), backend.to_owned()));
    labels
}

/// Flow-state sharing's metrics.
fn encode_sync(e: &mut DescriptorEncoder, sync: &crate::sync::Stats) -> std::fmt::Result {
    let peer = |a: &std::net::IpAddr| vec![("peer".to_owned(), a.to_string())];
    gauges(
        e,
        "vip_sync_peer_up",
        "1 while the connection with a flow-state peer is up, by direction (push: ours to it).",
        sync.peers.iter().flat_map(|(a, p)| {
            [("push", p.outbound_up), ("receive", p.inbound_up)].map(|(d, up)| {
                let mut labels = peer(a);
                labels.push(("direction".to_owned(), d.to_owned()));
                (labels, i64::from(up))
            })
        }),
    )?;
    let per_peer = |f: fn(&crate::sync::PeerStats) -> u64| -> Rows {
        sync.peers.iter().map(|(a, p)| (peer(a), f(p))).collect()
    };
    family(
        e,
        "vip_sync_entries_sent",
        "Exceptions pushed to a peer.",
        &per_peer(|p| p.entries_sent),
    )?;
    family(
        e,
        "vip_sync_entries_received",
        "Exceptions a peer pushed here (authenticated).",
        &per_peer(|p| p.entries_received),
    )?;
    family(
        e,
        "vip_sync_bytes_sent",
        "Bytes pushed to a peer.",
        &per_peer(|p| p.bytes_sent),
    )?;
    family(
        e,
        "vip_sync_bytes_received",
        "Bytes of authenticated frames from a peer.",
        &per_peer(|p| p.bytes_received),
    )?;
    gauges(
        e,
        "vip_sync_last_full_sync_timestamp_seconds",
        "When a peer last finished pushing every exception it holds.",
        sync.peers
            .iter()
            .filter_map(|(a, p)| Some((peer(a), p.last_full_sync?))),
    )?;
    gauges(
        e,
        "vip_sync_started_without_peer_state",
        "1 if this node announced at its start before a peer had pushed all its flow state \
         (fetch_timeout ran out).",
        sync.peers
            .iter()
            .map(|(a, p)| (peer(a), i64::from(p.started_without_state))),
    )?;
    counter(
        e,
        "vip_sync_entries_applied",
        "Peers' exceptions written into conntrack.",
        sync.applied,
    )?;
    family(
        e,
        "vip_sync_entries_rejected",
        "Peers' exceptions not written, by reason.",
        &one("reason", &sync.rejected),
    )?;
    family(
        e,
        "vip_sync_refused",
        "Flow-state frames and connections refused, by reason (forged, replayed, oversized, \
         malformed, not a peer, over the rate).",
        &one("reason", &sync.refused),
    )
}

/// Rows of a labelled family: (label pairs, value).
type Rows = Vec<(Vec<(String, String)>, u64)>;

/// A counter family.
fn family(e: &mut DescriptorEncoder, name: &str, help: &str, rows: &Rows) -> std::fmt::Result {
    let mut metric = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        let m = metric.encode_family(labels)?;
        ConstCounter::new(*value).encode(m)?;
    }
    Ok(())
}

/// A gauge family: one gauge per row of labels.
fn gauges<N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Vec<(String, String)>, N)>,
) -> std::fmt::Result {
    let mut metric = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Rows with one label.
fn one(label: &str, values: &[(String, u64)]) -> Rows {
    values
        .iter()
        .map(|(v, n)| (vec![(label.to_owned(), v.clone())], *n))
        .collect()
}

fn owned(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        if let Some(d) = &s.datapath {
            // Every outcome, from the one vocabulary: forwarded or passed, or dropped by reason.
            let rows = |drops: bool| -> Rows {
                let key = if drops { "reason" } else { "outcome" };
                Outcome::ALL
                    .iter()
                    .filter(|o| o.is_drop() == drops)
                    .map(|o| (vec![(key.to_owned(), o.label().to_owned())], d.of(*o)))
                    .collect()
            };
            family(
                &mut e,
                "vip_datapath_packets",
                "Packets by outcome.",
                &rows(false),
            )?;
            family(
                &mut e,
                "vip_datapath_drops",
                "Packets to VIPs dropped, by reason.",
                &rows(true),
            )?;
            counter(
                &mut e,
                "vip_conntrack_hits",
                "Backend chosen by a conntrack entry.",
                d.conntrack_hit,
            )?;
            counter(
                &mut e,
                "vip_conntrack_misses",
                "Backend chosen by Maglev.",
                d.conntrack_miss,
            )?;
            counter(
                &mut e,
                "vip_conntrack_inserts_skipped",
                "New flows forwarded without a conntrack entry: the per-CPU insert limit was reached.",
                d.conntrack_insert_skipped,
            )?;
            counter(
                &mut e,
                "vip_icmp_too_big",
                "ICMP too-big forwarded to the flow's backend.",
                d.icmp_too_big,
            )?;
        }
        let per_service = |f: fn(&TrafficCounters) -> u64| -> Rows {
            s.vips
                .iter()
                .map(|(vip, t)| (vip_labels(vip), f(t)))
                .collect()
        };
        family(
            &mut e,
            "vip_service_packets",
            "Packets forwarded per VIP (address, protocol, port).",
            &per_service(|t| t.packets),
        )?;
        family(
            &mut e,
            "vip_service_bytes",
            "Bytes (client packets) forwarded per VIP (address, protocol, port).",
            &per_service(|t| t.bytes),
        )?;
        let per_backend = |f: fn(&TrafficCounters) -> u64| -> Rows {
            s.backends
                .iter()
                .map(|((vip, backend), t)| (backend_labels(vip, backend), f(t)))
                .collect()
        };
        family(
            &mut e,
            "vip_backend_packets",
            "Packets forwarded per backend of a VIP.",
            &per_backend(|t| t.packets),
        )?;
        family(
            &mut e,
            "vip_backend_bytes",
            "Bytes (client packets) forwarded per backend of a VIP.",
            &per_backend(|t| t.bytes),
        )?;
        if let Some(sync) = &s.sync {
            encode_sync(&mut e, sync)?;
        }
        let block_labels = |b: &EgressBlockView| {
            vec![
                ("vip".to_owned(), b.vip.to_string()),
                ("block".to_owned(), b.block.to_string()),
                (
                    "owner".to_owned(),
                    b.owner.map_or_else(String::new, |o| o.to_string()),
                ),
            ]
        };
        let per_block = |f: fn(&TrafficCounters) -> u64| -> Rows {
            s.egress
                .iter()
                .filter_map(|(b, t)| Some((block_labels(b), f(t.as_ref()?))))
                .collect()
        };
        family(
            &mut e,
            "vip_egress_block_packets",
            "Packets sent to the owner of an egress block (replies to connections it opened \
             from the VIP).",
            &per_block(|t| t.packets),
        )?;
        family(
            &mut e,
            "vip_egress_block_bytes",
            "Bytes (reply packets) sent to the owner of an egress block.",
            &per_block(|t| t.bytes),
        )?;
        gauges(
            &mut e,
            "vip_egress_block_resting",
            "1 while an egress block rests after its backend left (its replies are dropped), \
             0 while its owner has it.",
            s.egress.iter().map(|(b, _)| {
                let mut labels = block_labels(b);
                labels.push(("first_port".to_owned(), b.first_port.to_string()));
                labels.push(("last_port".to_owned(), b.last_port.to_string()));
                (labels, i64::from(b.state == BlockState::Resting))
            }),
        )?;
        if let Some(c) = &s.conntrack {
            let family_label = |f: &str| vec![("family".to_owned(), f.to_owned())];
            gauges(
                &mut e,
                "vip_conntrack_entries",
                "Connection-tracking entries (counted at most every 10 s).",
                [
                    (family_label("ipv4"), c.entries_v4 as i64),
                    (family_label("ipv6"), c.entries_v6 as i64),
                ],
            )?;
            gauges(
                &mut e,
                "vip_conntrack_capacity",
                "Flows each connection-tracking table holds (node.conntrack_entries, rounded up).",
                [
                    (family_label("ipv4"), i64::from(c.capacity_v4)),
                    (family_label("ipv6"), i64::from(c.capacity_v6)),
                ],
            )?;
            gauges(
                &mut e,
                "vip_backend_conntrack_entries",
                "Connection-tracking entries that send to the backend (ipvsadm's connections: \
                 TCP entries stay until a new flow takes their way, UDP ones until idle).",
                s.backend_flows
                    .iter()
                    .map(|((vip, backend), n)| (backend_labels(vip, backend), *n as i64)),
            )?;
        }
        if let Some(d) = &s.decap {
            let outcomes = [
                ("decapsulated", d.decapsulated),
                ("passed", d.passed),
                ("refused_not_local", d.refused_not_local),
                ("refused_not_vip", d.refused_not_vip),
                ("refused_malformed", d.refused_malformed),
            ];
            let outcomes = owned(&outcomes);
            family(
                &mut e,
                "vip_decap_packets",
                "Backend decapsulation outcomes.",
                &one("outcome", &outcomes),
            )?;
        }
        let reloads = [
            ("success".into(), s.reloads_ok),
            ("failure".into(), s.reloads_failed),
        ];
        family(
            &mut e,
            "vip_config_reloads",
            "Config reloads by result.",
            &one("result", &reloads),
        )?;
        if !s.bgp.is_empty() {
            let peer = |p: &String| vec![("peer".to_owned(), p.clone())];
            gauges(
                &mut e,
                "vip_bgp_session_established",
                "1 while the BGP session is established.",
                s.bgp
                    .iter()
                    .map(|(p, st)| (peer(p), i64::from(st.state == State::Established))),
            )?;
            gauges(
                &mut e,
                "vip_bgp_routes_announced",
                "Routes announced to the peer.",
                s.bgp.iter().map(|(p, st)| (peer(p), st.announced as i64)),
            )?;
            let per_peer = |value: fn(&bgp::session::Status) -> u64| -> Rows {
                s.bgp.iter().map(|(p, st)| (peer(p), value(st))).collect()
            };
            family(
                &mut e,
                "vip_bgp_session_flaps",
                "Times the established session went down.",
                &per_peer(|st| st.flaps),
            )?;
            family(
                &mut e,
                "vip_bgp_updates_sent",
                "UPDATE messages sent to the peer.",
                &per_peer(|st| st.messages.updates_sent),
            )?;
            family(
                &mut e,
                "vip_bgp_updates_received",
                "UPDATE messages received from the peer.",
                &per_peer(|st| st.messages.updates_received),
            )?;
            family(
                &mut e,
                "vip_bgp_notifications_sent",
                "NOTIFICATION messages sent to the peer.",
                &per_peer(|st| st.messages.notifications_sent),
            )?;
            family(
                &mut e,
                "vip_bgp_notifications_received",
                "NOTIFICATION messages received from the peer.",
                &per_peer(|st| st.messages.notifications_received),
            )?;
        }
        if !s.bfd.is_empty() {
            let peer = |p: &String| vec![("peer".to_owned(), p.clone())];
            gauges(
                &mut e,
                "vip_bfd_session_up",
                "1 while the BFD session is Up.",
                s.bfd
                    .iter()
                    .map(|(p, b)| (peer(p), i64::from(b.state == bfd::packet::State::Up))),
            )?;
            gauges(
                &mut e,
                "vip_bfd_session_info",
                "The BFD session's state, last diagnostic and the peer's discriminator.",
                s.bfd.iter().map(|(p, b)| {
                    let mut labels = peer(p);
                    labels.push(("state".into(), format!("{:?}", b.state)));
                    labels.push(("diag".into(), format!("{:?}", b.diag)));
                    labels.push((
                        "remote_discriminator".into(),
                        b.remote_discriminator.to_string(),
                    ));
                    (labels, 1i64)
                }),
            )?;
            gauges(
                &mut e,
                "vip_bfd_tx_interval_seconds",
                "The negotiated interval between our BFD packets.",
                s.bfd
                    .iter()
                    .map(|(p, b)| (peer(p), b.tx_interval.as_secs_f64())),
            )?;
            gauges(
                &mut e,
                "vip_bfd_detection_time_seconds",
                "How long without a packet before the peer is declared down.",
                s.bfd
                    .iter()
                    .map(|(p, b)| (peer(p), b.detection_time.as_secs_f64())),
            )?;
            let flaps: Rows = s.bfd.iter().map(|(p, b)| (peer(p), b.flaps)).collect();
            family(
                &mut e,
                "vip_bfd_session_flaps",
                "Times the BFD session left Up.",
                &flaps,
            )?;
            family(
                &mut e,
                "vip_bfd_packets_refused",
                "Received BFD packets refused, by reason.",
                &one("reason", &s.bfd_refused),
            )?;
        }
        if !s.health.is_empty() {
            let labels = |(vip, backend): &(VipName, String)| backend_labels(vip, backend);
            gauges(
                &mut e,
                "vip_backend_healthy",
                "1 while the backend passes its health checks.",
                s.health
                    .iter()
                    .map(|(key, c)| (labels(key), i64::from(c.up))),
            )?;
            gauges(
                &mut e,
                "vip_backend_check_seconds",
                "Latency of the last health check.",
                s.health
                    .iter()
                    .map(|(key, c)| (labels(key), c.latency.as_secs_f64())),
            )?;
            let mut metric = e.encode_descriptor(
                "vip_backend_check_duration_seconds",
                "How long health checks took.",
                None,
                MetricType::Histogram,
            )?;
            for (key, c) in &s.health {
                let d = &c.durations;
                let count = d.counts.iter().sum();
                metric
                    .encode_family(&labels(key))?
                    .encode_histogram::<NoLabelSet>(
                        d.sum.as_secs_f64(),
                        count,
                        &d.buckets(),
                        None,
                    )?;
            }
            let rows: Rows = s
                .health
                .iter()
                .map(|(key, c)| (labels(key), c.changes))
                .collect();
            family(
                &mut e,
                "vip_backend_health_changes",
                "Health state changes.",
                &rows,
            )?;
        }
        let label = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        gauges(
            &mut e,
            "vip_build_info",
            "The agent's version; 1 while it runs.",
            [(label("version", env!("CARGO_PKG_VERSION")), 1i64)],
        )?;
        gauge(
            &mut e,
            "vip_ready",
            "1 while the datapath is attached and holds the running config.",
            i64::from(s.ready),
        )?;
        gauge(
            &mut e,
            "vip_node_drained",
            "1 while the node is drained (its routes marked GRACEFUL_SHUTDOWN).",
            i64::from(s.node_drained),
        )?;
        gauges(
            &mut e,
            "vip_xdp_attached",
            "1 for each interface the datapath is attached to, by how.",
            s.attached.iter().map(|(iface, how)| {
                (
                    vec![
                        ("interface".to_owned(), iface.clone()),
                        ("mode".to_owned(), how.clone()),
                    ],
                    1i64,
                )
            }),
        )?;
        gauges(
            &mut e,
            "vip_forwardable",
            "1 while the VIP can be forwarded (a backend takes new flows): it is announced.",
            s.forwardable
                .iter()
                .map(|(vip, up)| (vip_labels(vip), i64::from(*up))),
        )?;
        if let Some((when, ok)) = s.last_reload {
            gauge(
                &mut e,
                "vip_config_last_reload_successful",
                "1 if the last reload was applied.",
                i64::from(ok),
            )?;
            gauge(
                &mut e,
                "vip_config_last_reload_timestamp_seconds",
                "When the last reload was tried.",
                when,
            )?;
        }
        Ok(())
    }
}

/// Content types of the two expositions.
const OPEN_METRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_FORMAT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition: a counter's HELP
/// and TYPE lines name its `_total` samples, and there is no `# EOF` (or `# UNIT`).
fn text_format(open_metrics: &str) -> String {
    let counters: HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out += renamed.as_deref().unwrap_or(line);
        out.push('\n');
    }
    out
}

/// Encodes a snapshot in the OpenMetrics text format.
pub(crate) fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    sources: Arc<MetricsSources>,
) -> std::io::Result<()> {
    // At most this many connections at once; more wait in the kernel's queue. A connection
    // that has not sent its request within the timeout is closed: idle or slow clients cannot
    // hold the scrapes off for long.
    const MAX_CONNECTIONS: usize = 256;
    const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of descriptors, say: not a reason to stop serving.
                tracing::warn!(error = %e, "metrics listener accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut request = vec![0u8; 4096];
            let mut len = 0;
            // Requests are one line plus headers; stop at the blank line or 4 KiB.
            let read = async {
                while len < request.len() && !request[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut request[len..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => len += n,
                    }
                }
                true
            };
            if !matches!(tokio::time::timeout(REQUEST_TIMEOUT, read).await, Ok(true)) {
                return;
            }
            let head = String::from_utf8_lossy(&request[..len]);
            let mut words = head.split_whitespace();
            let method = words.next().unwrap_or("");
            let path = words.next().unwrap_or("");
            let ready = sources.view.borrow().ready;
            // Prometheus asks for OpenMetrics; anything else gets the classic text format.
            let open_metrics = head.lines().any(|l| {
                let l = l.to_ascii_lowercase();
                l.starts_with("accept:") && l.contains("application/openmetrics-text")
            });
            let mut content_type = "text/plain; charset=utf-8";
            let (status, body) = match (method, path) {
                ("GET", "/metrics") if open_metrics => {
                    content_type = OPEN_METRICS_TYPE;
                    ("200 OK", render(sources.snapshot()))
                }
                ("GET", "/metrics") => {
                    content_type = TEXT_FORMAT_TYPE;
                    ("200 OK", text_format(&render(sources.snapshot())))
                }
                ("GET", "/healthz") => ("200 OK", "ok\n".to_owned()),
                ("GET", "/readyz") if ready => ("200 OK", "ready\n".to_owned()),
                ("GET", "/readyz") => ("503 Service Unavailable", "not ready\n".to_owned()),
                ("GET", _) => ("404 Not Found", "not found\n".to_owned()),
                _ => (
                    "405 Method Not Allowed",
                    "metrics only; controls are on the control socket\n".to_owned(),
                ),
            };
            let mut response = String::new();
            let _ = write!(
                response,
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_snapshot() -> Snapshot {
        let traffic = TrafficCounters {
            packets: 1,
            bytes: 2,
        };
        let vip = VipName {
            protocol: crate::config::Protocol::Tcp,
            address: "198.51.100.1".parse().unwrap(),
            port: 443,
        };
        Snapshot {
            datapath: Some(DatapathStats::default()),
            decap: Some(DecapStats::default()),
            vips: vec![(vip, traffic)],
            backends: vec![((vip, "192.0.2.21".into()), traffic)],
            egress: vec![(
                EgressBlockView {
                    vip: vip.address,
                    block: 0,
                    first_port: 40_000,
                    last_port: 40_099,
                    owner: Some("192.0.2.21".parse().unwrap()),
                    state: BlockState::Active,
                    previous: None,
                    rest_left: None,
                    backend_id: Some(1),
                },
                Some(traffic),
            )],
            sync: Some(crate::sync::Stats {
                peers: vec![(
                    "192.0.2.3".parse().unwrap(),
                    crate::sync::PeerStats {
                        outbound_up: true,
                        last_full_sync: Some(1),
                        ..Default::default()
                    },
                )],
                refused: vec![("replay".into(), 1)],
                applied: 1,
                rejected: vec![("idle".into(), 1)],
            }),
            reloads_ok: 1,
            reloads_failed: 0,
            bgp: vec![(
                "192.0.2.1".into(),
                bgp::session::Status {
                    state: State::Established,
                    announced: 1,
                    ..Default::default()
                },
            )],
            bfd: vec![(
                "192.0.2.1".into(),
                bfd::Status {
                    state: bfd::packet::State::Up,
                    remote_state: bfd::packet::State::Up,
                    diag: bfd::packet::Diag::None,
                    local_discriminator: 1,
                    remote_discriminator: 2,
                    tx_interval: std::time::Duration::from_millis(100),
                    detection_time: std::time::Duration::from_millis(300),
                    flaps: 1,
                },
            )],
            bfd_refused: owned(&[("ttl", 1)]),
            conntrack: Some(Census {
                entries_v4: 3,
                capacity_v4: 4096,
                capacity_v6: 4096,
                ..Default::default()
            }),
            backend_flows: vec![((vip, "192.0.2.21".into()), 3)],
            health: vec![(
                (vip, "192.0.2.21".into()),
                CheckView {
                    up: true,
                    detail: "ok".into(),
                    latency: std::time::Duration::from_millis(1),
                    changes: 2,
                    durations: Default::default(),
                },
            )],
            ready: true,
            node_drained: false,
            attached: vec![("eth0".into(), "driver mode".into())],
            last_reload: Some((1.7e9, true)),
            forwardable: vec![(vip, true)],
        }
    }

    /// The metric names used in a file (`vip_` and more), without the PromQL around them.
    fn metric_names(text: &str) -> HashSet<String> {
        let mut names = HashSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("vip_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            // "vip-lb", "vip_up" as a label_values argument, and so on: names only.
            if name.len() > 4 {
                names.insert(name);
            }
        }
        names
    }

    /// The sample names an exposition holds.
    fn exported(text: &str) -> HashSet<&str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect()
    }

    /// Asserts every metric `file` (under the repository) uses is exported; at least `min`.
    fn uses_only_exported(file: &str, min: usize) {
        let text = render(full_snapshot());
        let exported = exported(&text);
        let path = format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"));
        let used = metric_names(&std::fs::read_to_string(&path).expect(file));
        assert!(used.len() >= min, "{file}: {used:?}");
        for name in &used {
            assert!(
                exported.contains(name.as_str()),
                "{file} uses {name}, which is not exported: {exported:?}"
            );
        }
    }

    /// Every metric the shipped alert rules use is one the agent exports.
    #[test]
    fn alert_rules_use_only_exported_metrics() {
        uses_only_exported("deploy/prometheus/vip-alerts.yml", 5);
    }

    /// Every metric name the dashboard queries is one the agent exports.
    #[test]
    fn dashboard_queries_only_exported_metrics() {
        uses_only_exported("deploy/grafana/vip-dashboard.json", 10);
    }
}
