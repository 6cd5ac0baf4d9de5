//! Exceptions: tracked flows whose backend is not the one the VIP's live table gives them,
//! found in this node's conntrack tables; and entries from peers written into them.

use std::{net::SocketAddr, time::Duration};

use vip_common::{
    BACKEND_F_PRESENT, CONN_F_PEER, ConnEntry, FlowKey, IPPROTO_UDP, VipKey, addr_from_bytes,
    hash::flow_hash,
};

use super::wire::Entry;
use crate::apply::Lookup;

/// Why a received entry was not written (the metric's labels).
pub const REJECTIONS: [&str; 4] = ["unknown_vip", "unknown_backend", "idle", "local_entry"];

/// The conntrack clock (`bpf_ktime_get_coarse_ns`): CLOCK_MONOTONIC_COARSE.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The exceptions among `flows` (this node's conntrack entries) at `now_ns`: entries of a
/// present backend that the VIP's live table would not choose, not idle past the VIP's UDP
/// timeout. Entries learned from peers count too: a node that starts later needs them.
pub fn exceptions(lookup: &Lookup, flows: &[(FlowKey, ConnEntry)], now_ns: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    for (flow, entry) in flows {
        let Some((key, meta)) = lookup.vip_by_id(entry.vip_id) else {
            continue;
        };
        if key.addr != flow.dst || key.proto != flow.proto || key.family != flow.family {
            continue;
        }
        let Some(((vip, backend_addr), backend)) = lookup.backend_by_id(entry.backend) else {
            continue;
        };
        let current = entry.backend_tag == 0 || entry.backend_tag == backend.tag;
        if vip != key || backend.flags & BACKEND_F_PRESENT == 0 || !current {
            continue;
        }
        let idle = now_ns.saturating_sub(entry.last_seen_ns);
        if flow.proto == IPPROTO_UDP && idle > meta.udp_idle_ns {
            continue;
        }
        let Some(table) = lookup.table(key) else {
            continue;
        };
        if table.lookup(flow_hash(flow, meta.hash_port_mask)) == entry.backend {
            continue;
        }
        let (Some(client), Some(vip_addr)) = (
            addr_from_bytes(&flow.src, flow.family),
            addr_from_bytes(&flow.dst, flow.family),
        ) else {
            continue;
        };
        out.push(Entry {
            protocol: flow.proto,
            client,
            client_port: u16::from_be_bytes(flow.src_port),
            vip: vip_addr,
            vip_port: u16::from_be_bytes(flow.dst_port),
            service_port: u16::from_be_bytes(key.port),
            backend: *backend_addr,
            idle_ms: if flow.proto == IPPROTO_UDP {
                u32::try_from(idle / 1_000_000).unwrap_or(u32::MAX)
            } else {
                0
            },
        });
    }
    out
}

/// What to write for a peer's entry: the flow and its entry here, or why not. `local` reads
/// this node's own entry for a flow (asked only for entries that could be written): a flow
/// this node tracks itself keeps its entry.
pub fn entry_for(
    lookup: &Lookup,
    e: &Entry,
    local: impl FnOnce(&FlowKey) -> Option<ConnEntry>,
    now_ns: u64,
) -> Result<(FlowKey, ConnEntry), &'static str> {
    let key = VipKey::new(e.vip, e.protocol, e.service_port);
    let meta = lookup.vip(&key).ok_or("unknown_vip")?;
    if meta.egress_block_size != 0 {
        return Err("unknown_vip");
    }
    let (id, backend) = lookup
        .backend(&(key, e.backend))
        .filter(|(_, b)| b.flags & BACKEND_F_PRESENT != 0)
        .ok_or("unknown_backend")?;
    let idle = Duration::from_millis(u64::from(e.idle_ms)).as_nanos() as u64;
    if e.protocol == IPPROTO_UDP && idle > meta.udp_idle_ns {
        return Err("idle");
    }
    let flow = FlowKey::between(
        SocketAddr::new(e.client, e.client_port),
        SocketAddr::new(e.vip, e.vip_port),
        e.protocol,
    );
    if local(&flow).is_some_and(|l| l.flags & CONN_F_PEER == 0) {
        return Err("local_entry");
    }
    let entry = ConnEntry {
        backend: *id,
        vip_id: meta.vip_id,
        last_seen_ns: now_ns.saturating_sub(idle),
        flow_hash: flow_hash(&flow, meta.hash_port_mask),
        backend_tag: backend.tag,
        flags: CONN_F_PEER,
    };
    Ok((flow, entry))
}
