//! The pinned datapath, decoded.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result, bail};
use vip_common::{Outcome, addr_from_bytes};

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

/// Prints the connection-tracking entries, decoded (only those of `vip` if given).
pub fn flows(pin_dir: &Path, vip: Option<IpAddr>) -> Result<()> {
    let dp = open_pinned(pin_dir)?;
    let backends: std::collections::HashMap<u32, IpAddr> = dp
        .backends()?
        .into_iter()
        .filter_map(|(id, b)| Some((id, addr_from_bytes(&b.addr, b.family)?)))
        .collect();
    let mut shown = 0;
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
        let proto = match flow.proto {
            vip_common::IPPROTO_TCP => "tcp",
            vip_common::IPPROTO_UDP => "udp",
            _ => "?",
        };
        let backend = backends.get(&entry.backend).map_or_else(
            || format!("#{} (removed)", entry.backend),
            |a| a.to_string(),
        );
        println!(
            "{proto} {} -> {} backend {backend}",
            SocketAddr::new(src, u16::from_be_bytes(flow.src_port)),
            SocketAddr::new(dst, u16::from_be_bytes(flow.dst_port)),
        );
        shown += 1;
    }
    println!("{shown} flows");
    Ok(())
}

/// Prints which backend a flow goes to, asking the loaded program.
pub fn which(pin_dir: &Path, vip: SocketAddr, flow: SocketAddr, protocol: &str) -> Result<()> {
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
    let key = test_run::flow_key(flow, vip, proto);
    let tracked = dp.conntrack(&key)?.is_some();
    let (action, out) = test_run::run(&mut dp, &frame)?;
    if !tracked {
        dp.remove_flow(&key)?;
    }
    match test_run::outer_destination(&frame, &out) {
        Some(backend) => println!("{protocol} {flow} -> {vip}: backend {backend}"),
        None => println!("{protocol} {flow} -> {vip}: not forwarded (XDP action {action})"),
    }
    Ok(())
}

/// Prints VIPs, backends and counters from the pinned maps.
pub fn status(pin_dir: &Path) -> Result<()> {
    let dp = open_pinned(pin_dir)?;
    let s = dp.stats()?;
    let line = |drops: bool| {
        Outcome::ALL
            .iter()
            .filter(|o| o.is_drop() == drops)
            .map(|o| format!("{} {}", s.of(*o), o.status_text()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("datapath: {}", line(false));
    println!("  drops: {}", line(true));
    println!(
        "  conntrack: {} hits, {} misses",
        s.conntrack_hit, s.conntrack_miss
    );
    println!(
        "  new flows not recorded (conntrack insert limit): {}",
        s.conntrack_insert_skipped
    );
    println!("VIPs (traffic of their present backends):");
    let traffic = dp.traffic_by_vip()?;
    for (key, meta) in dp.vips()? {
        let t = traffic.get(&meta.vip_id).copied().unwrap_or_default();
        let addr = addr_from_bytes(&key.addr, key.family).map_or("?".into(), |a| a.to_string());
        let port = u16::from_be_bytes(key.port);
        let encap = if meta.flags & vip_common::VIP_F_GUE != 0 {
            format!("GUE to port {}", u16::from_be_bytes(meta.gue_port))
        } else {
            "IP-in-IP".to_owned()
        };
        println!(
            "  {addr} proto {} port {} ({encap}) -> table slot {}: {} packets, {} bytes",
            key.proto,
            if port == 0 {
                "*".into()
            } else {
                port.to_string()
            },
            meta.table,
            t.packets,
            t.bytes
        );
    }
    let vips = dp.vips()?;
    println!("backends:");
    for (id, b) in dp.backends()? {
        let vip = vips
            .iter()
            .find(|(_, m)| m.vip_id == b.vip_id)
            .and_then(|(k, _)| addr_from_bytes(&k.addr, k.family))
            .map_or("?".to_owned(), |a| a.to_string());
        let t = dp.backend_traffic(id)?;
        let addr = addr_from_bytes(&b.addr, b.family).map_or("?".into(), |a| a.to_string());
        let hop = if b.flags & vip_common::BACKEND_F_NEXTHOP != 0 {
            format!("via ifindex {} to {}", b.ifindex, mac(&b.dst_mac))
        } else {
            "next hop unresolved (FIB lookup)".into()
        };
        println!(
            "  [{id}] {addr} of VIP {vip} {hop}: {} packets, {} bytes",
            t.packets, t.bytes
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
