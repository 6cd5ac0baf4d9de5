//! The pinned datapath, decoded.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use vip_common::{Outcome, addr_from_bytes};

use crate::config::VipName;

use crate::dataplane::{Dataplane, DataplaneOptions, test_run};

/// Opens the running datapath's pinned maps (a second copy of the program, not attached),
/// with the sizes it was loaded with.
fn open_pinned(pin_dir: &Path) -> Result<Dataplane> {
    if !pin_dir.join(vip_common::layout::VIPS).exists() {
        bail!("no vip datapath pinned under {}", pin_dir.display());
    }
    let options = DataplaneOptions::from_pins(pin_dir)
        .with_context(|| format!("reading the datapath's sizes under {}", pin_dir.display()))?;
    Dataplane::load(options).context("opening the pinned maps")
}

/// How the inspection commands print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A protocol number's name.
fn protocol_name(proto: u8) -> &'static str {
    match proto {
        vip_common::IPPROTO_TCP => "tcp",
        vip_common::IPPROTO_UDP => "udp",
        vip_common::IPPROTO_ICMP => "icmp",
        vip_common::IPPROTO_ICMPV6 => "icmpv6",
        _ => "?",
    }
}

/// An interface as `NAME (ifindex N)`, named as this network namespace names that index (the
/// agent's own when run on its node), or just `ifindex N`.
fn interface_name(ifindex: u32) -> String {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if name.is_null() {
        return format!("ifindex {ifindex}");
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    format!(
        "{} (ifindex {ifindex})",
        String::from_utf8_lossy(&buf[..len])
    )
}

/// One tracked flow.
#[derive(Serialize)]
struct FlowRow {
    protocol: &'static str,
    client: SocketAddr,
    vip: SocketAddr,
    /// `None`: its backend id is no longer in use (the entry is ignored).
    backend: Option<IpAddr>,
    backend_id: u32,
    /// Written from a peer LB node's flow state (`[sync]`), not by this node's datapath.
    from_peer: bool,
}

/// Prints the connection-tracking entries, decoded (only those of `vip` if given).
pub fn flows(pin_dir: &Path, vip: Option<IpAddr>, output: Output) -> Result<()> {
    let dp = open_pinned(pin_dir)?;
    let backends: std::collections::HashMap<u32, IpAddr> = dp
        .backends()?
        .into_iter()
        .filter_map(|(id, b)| Some((id, addr_from_bytes(&b.addr, b.family)?)))
        .collect();
    let mut rows = Vec::new();
    for (flow, entry) in dp.flows()? {
        let (Some(src), Some(dst)) = (
            addr_from_bytes(&flow.src, flow.family),
            addr_from_bytes(&flow.dst, flow.family),
        ) else {
            continue;
        };
        if vip.is_some_and(|v| v != dst) {
            continue;
        }
        rows.push(FlowRow {
            protocol: protocol_name(flow.proto),
            client: SocketAddr::new(src, u16::from_be_bytes(flow.src_port)),
            vip: SocketAddr::new(dst, u16::from_be_bytes(flow.dst_port)),
            backend: backends.get(&entry.backend).copied(),
            backend_id: entry.backend,
            from_peer: entry.flags & vip_common::CONN_F_PEER != 0,
        });
    }
    if output == Output::Json {
        return print_json(&rows);
    }
    for r in &rows {
        let backend = r
            .backend
            .map_or_else(|| format!("#{} (removed)", r.backend_id), |a| a.to_string());
        let from = if r.from_peer { " (from a peer)" } else { "" };
        println!(
            "{} {} -> {} backend {backend}{from}",
            r.protocol, r.client, r.vip
        );
    }
    println!("{} flows", rows.len());
    Ok(())
}

/// What the loaded program did with a probe of a flow.
#[derive(Serialize)]
struct WhichAnswer {
    protocol: String,
    client: SocketAddr,
    vip: SocketAddr,
    /// The backend it was encapsulated to, if it was.
    backend: Option<IpAddr>,
    /// The egress block the VIP port falls in: the backend owns it (no Maglev, no conntrack).
    egress_block: Option<u32>,
    action: &'static str,
}

/// Prints which backend a flow goes to, asking the loaded program.
pub fn which(
    pin_dir: &Path,
    vip: SocketAddr,
    flow: SocketAddr,
    protocol: &str,
    output: Output,
) -> Result<()> {
    let proto = match protocol {
        "tcp" => vip_common::IPPROTO_TCP,
        "udp" => vip_common::IPPROTO_UDP,
        other => bail!("protocol {other}: use tcp or udp"),
    };
    if vip.is_ipv4() != flow.is_ipv4() {
        bail!("--vip and --flow must be of the same family");
    }
    let mut dp = open_pinned(pin_dir)?;
    let frame = test_run::frame(flow, vip, proto);
    // The probe is a packet of the flow, and such a packet records the flow: a question must
    // not, so an entry it made goes again.
    let key = vip_common::FlowKey::between(flow, vip, proto);
    let tracked = dp.conntrack(&key)?.is_some();
    let (action, out) = test_run::run(&mut dp, &frame)?;
    // Egress ports (and dropped packets) make no entry.
    if !tracked && dp.conntrack(&key)?.is_some() {
        dp.remove_flow(&key)?;
    }
    let egress_key = vip_common::VipKey::new(vip.ip(), proto, 0);
    let egress_block = dp
        .vips()?
        .iter()
        .find(|(k, _)| *k == egress_key)
        .and_then(|(_, meta)| meta.egress_block(vip.port()));
    let answer = WhichAnswer {
        protocol: protocol.to_owned(),
        client: flow,
        vip,
        egress_block,
        backend: test_run::outer_destination(&frame, &out),
        action: match action {
            1 => "XDP_DROP",
            2 => "XDP_PASS",
            3 => "XDP_TX",
            4 => "XDP_REDIRECT",
            _ => "XDP_ABORTED",
        },
    };
    if output == Output::Json {
        return print_json(&answer);
    }
    let owner = match egress_block {
        Some(block) => format!("owner of egress block {block}"),
        None => "backend".to_owned(),
    };
    match answer.backend {
        Some(backend) => println!("{protocol} {flow} -> {vip}: {owner} {backend}"),
        None => println!(
            "{protocol} {flow} -> {vip}: not forwarded ({})",
            answer.action
        ),
    }
    Ok(())
}

/// The pinned datapath's state and counters.
#[derive(Serialize)]
struct StatusReport {
    /// Packets by outcome (the Prometheus labels).
    outcomes: Vec<(&'static str, u64)>,
    conntrack_hits: u64,
    conntrack_misses: u64,
    conntrack_inserts_skipped: u64,
    vips: Vec<VipRow>,
    backends: Vec<BackendRow>,
}

#[derive(Serialize)]
struct VipRow {
    vip: String,
    encapsulation: String,
    table_slot: u32,
    packets: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct BackendRow {
    id: u32,
    address: Option<IpAddr>,
    vip: Option<String>,
    /// The resolved next hop's interface and MAC; `None`: the kernel's FIB decides.
    next_hop: Option<(String, String)>,
    packets: u64,
    bytes: u64,
}

fn status_report(dp: &Dataplane) -> Result<StatusReport> {
    let s = dp.stats()?;
    let traffic = dp.traffic_by_vip()?;
    let vips = dp.vips()?;
    let name = |key: &vip_common::VipKey| {
        let meta = vips.iter().find(|(k, _)| k == key).map(|(_, m)| m)?;
        if meta.egress_block_size == 0 {
            return VipName::of(key).map(|n| n.to_string());
        }
        let addr = addr_from_bytes(&key.addr, key.family)?;
        let last = meta.egress_first + meta.egress_span;
        Some(format!(
            "egress {}/{addr} ports {}-{last}, blocks of {}",
            protocol_name(key.proto),
            meta.egress_first,
            meta.egress_block_size
        ))
    };
    let mut report = StatusReport {
        outcomes: Outcome::ALL.iter().map(|o| (o.label(), s.of(*o))).collect(),
        conntrack_hits: s.conntrack_hit,
        conntrack_misses: s.conntrack_miss,
        conntrack_inserts_skipped: s.conntrack_insert_skipped,
        vips: Vec::new(),
        backends: Vec::new(),
    };
    for (key, meta) in &vips {
        let t = traffic.get(&meta.vip_id).copied().unwrap_or_default();
        report.vips.push(VipRow {
            vip: name(key).unwrap_or_else(|| "?".into()),
            encapsulation: if meta.flags & vip_common::VIP_F_GUE != 0 {
                format!("GUE to port {}", u16::from_be_bytes(meta.gue_port))
            } else {
                "IP-in-IP".to_owned()
            },
            table_slot: meta.table,
            packets: t.packets,
            bytes: t.bytes,
        });
    }
    for (id, b) in dp.backends()? {
        let t = dp.backend_traffic(id)?;
        report.backends.push(BackendRow {
            id,
            address: addr_from_bytes(&b.addr, b.family),
            vip: vips
                .iter()
                .find(|(_, m)| m.vip_id == b.vip_id)
                .and_then(|(k, _)| name(k)),
            next_hop: (b.flags & vip_common::BACKEND_F_NEXTHOP != 0)
                .then(|| (interface_name(b.ifindex), mac(&b.dst_mac))),
            packets: t.packets,
            bytes: t.bytes,
        });
    }
    Ok(report)
}

/// Prints VIPs, backends and counters from the pinned maps; with JSON, `agent` (the running
/// agent's own status) goes into the same document.
pub fn status(pin_dir: &Path, output: Output, agent: impl Serialize) -> Result<()> {
    let dp = open_pinned(pin_dir)?;
    let r = status_report(&dp)?;
    if output == Output::Json {
        #[derive(Serialize)]
        struct Whole<A> {
            datapath: StatusReport,
            agent: A,
        }
        return print_json(&Whole { datapath: r, agent });
    }
    let line = |drops: bool| {
        Outcome::ALL
            .iter()
            .zip(&r.outcomes)
            .filter(|(o, _)| o.is_drop() == drops)
            .map(|(o, (_, n))| format!("{n} {}", o.status_text()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("datapath: {}", line(false));
    println!("  drops: {}", line(true));
    println!(
        "  conntrack: {} hits, {} misses",
        r.conntrack_hits, r.conntrack_misses
    );
    println!(
        "  new flows not recorded (conntrack insert limit): {}",
        r.conntrack_inserts_skipped
    );
    println!("VIPs (traffic of their present backends):");
    for v in &r.vips {
        println!(
            "  {} ({}) -> table slot {}: {} packets, {} bytes",
            v.vip, v.encapsulation, v.table_slot, v.packets, v.bytes
        );
    }
    println!("backends:");
    for b in &r.backends {
        let addr = b.address.map_or("?".into(), |a| a.to_string());
        let vip = b.vip.as_deref().unwrap_or("?");
        let hop = match &b.next_hop {
            Some((iface, mac)) => format!("via {iface} to {mac}"),
            None => "next hop unresolved (FIB lookup)".into(),
        };
        println!(
            "  [{}] {addr} of VIP {vip} {hop}: {} packets, {} bytes",
            b.id, b.packets, b.bytes
        );
    }
    Ok(())
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
