//! Backend choice: connection tracking first, the VIP's Maglev table otherwise.

use vip_common::{
    BACKEND_F_PRESENT, Backend, BackendId, ConnEntry, DatapathStats, FlowKey, INSERT_WINDOW_SHIFT,
    IPPROTO_UDP, Outcome, TrafficCounters, VipMeta,
    hash::{flow_hash, maglev_slot},
};

use crate::{
    conntrack::{self, now},
    maps::{BACKEND_STATS, BACKENDS, DATAPATH_CONFIG, INSERT_BUDGET, MAGLEV, VIP_META},
    replay::{self, Replay},
};

/// How a packet uses connection tracking.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnPolicy {
    /// A TCP SYN: always the Maglev answer (a new connection). An old entry for the same
    /// 5-tuple is overwritten, but no entry is created: the handshake's first ACK records the
    /// flow. A flood of spoofed SYNs, which never ACK, so cannot evict real clients' flows.
    New,
    /// TCP: an entry decides; on a miss, Maglev decides and is recorded.
    Track,
    /// UDP: as `Track`, but entries idle longer than the VIP's timeout are ignored.
    TrackIdle,
    /// ICMP "too big" errors: an entry decides if there is one; nothing is recorded.
    LookupOnly,
    /// Other ICMP errors and echo replies: forwarded only when they belong to an egress flow
    /// (see [`egress`]), passed otherwise.
    EgressOnly,
    /// Fragments of addresses-only VIPs: Maglev only (every fragment hashes alike).
    Stateless,
}

impl ConnPolicy {
    #[inline(always)]
    pub(crate) fn for_packet(proto: u8, syn: bool) -> Self {
        if proto == IPPROTO_UDP {
            Self::TrackIdle
        } else if syn {
            Self::New
        } else {
            Self::Track
        }
    }
}

/// The chosen backend.
pub(crate) struct Choice {
    pub id: BackendId,
    pub backend: &'static Backend,
    /// The flow hash, also the entropy for outer source addresses and ports.
    pub hash: u32,
}

#[inline(always)]
fn usable(id: BackendId) -> Option<&'static Backend> {
    BACKENDS
        .get(id)
        .filter(|b| b.flags & BACKEND_F_PRESENT != 0)
}

/// An established flow, as its conntrack entry (see `conntrack::entry`) says.
pub(crate) enum Established {
    /// Its packets leave with the headers recorded from an earlier one (see `replay`), to
    /// the backend of its entry.
    Replay(&'static Replay, BackendId),
    /// Its VIP and backend, read for this packet, and where to record the headers it leaves
    /// with.
    Resolved(&'static VipMeta, Choice, Recording),
}

/// Where a flow's headers are recorded, and the `CONFIG_GENERATION` they are read under.
pub(crate) struct Recording {
    pub replay: &'static mut Replay,
    pub generation: u64,
}

/// An established flow: its recorded headers while they hold; otherwise its conntrack entry,
/// and the settings of the VIP the entry was made for, read by `vip_id` from `VIP_META` (an
/// array read) instead of looking the VIP up by key. The entry counts only while that VIP still
/// is the flow's VIP (a removed VIP's id may be reused), its backend is usable and still the
/// one it was made for (backend ids are reused too), and, for UDP, it is not idle past the
/// VIP's timeout.
#[inline(always)]
pub(crate) fn established(
    flow: &FlowKey,
    policy: ConnPolicy,
    l2_len: usize,
) -> Option<Established> {
    if !matches!(
        policy,
        ConnPolicy::Track | ConnPolicy::TrackIdle | ConnPolicy::LookupOnly
    ) {
        return None;
    }
    let tracked = conntrack::entry(flow)?;
    // Read before the VIP and backend, so a change the agent makes after those reads moves it
    // past what a recording made from them carries.
    let generation = replay::generation();
    if !tracked.shared && tracked.replay.holds(generation, l2_len) {
        return Some(Established::Replay(tracked.replay, tracked.entry.backend));
    }
    let entry = tracked.entry;
    let meta = VIP_META.get(entry.vip_id)?;
    let vip = &meta.vip;
    if vip.addr != flow.dst
        || vip.proto != flow.proto
        || vip.family != flow.family
        || (vip.port != flow.dst_port && vip.port != [0; 2])
    {
        return None;
    }
    // The table's entry, read for this packet (at least once per refresh of the cached copy):
    // marked used, so its bucket evicts others first, and for UDP checked for idleness first.
    // Idle time is measured to within a refresh (at most 320 ms, under the shortest timeout,
    // 1 s), and a packet served from the copy reads no clock.
    if tracked.shared {
        let now = now();
        if policy == ConnPolicy::TrackIdle
            && now.wrapping_sub(entry.last_seen_ns) > meta.udp_idle_ns
        {
            return None;
        }
        entry.last_seen_ns = now;
    }
    let backend = usable(entry.backend)?;
    // A reused id: the entry was made for the backend that held it before.
    if entry.backend_tag != backend.tag && entry.backend_tag != 0 {
        return None;
    }
    let choice = Choice {
        id: entry.backend,
        backend,
        hash: entry.flow_hash,
    };
    let recording = Recording {
        replay: tracked.replay,
        generation,
    };
    Some(Established::Resolved(meta, choice, recording))
}

/// The VIP's Maglev answer for `flow` (recorded in conntrack as `policy` says), or `None` when
/// the VIP has no usable backend.
#[inline(always)]
pub(crate) fn backend(
    meta: &VipMeta,
    flow: &FlowKey,
    policy: ConnPolicy,
    stats: &mut DatapathStats,
) -> Option<Choice> {
    let hash = flow_hash(flow, meta.hash_port_mask);
    let config = DATAPATH_CONFIG.get(0)?;
    let table_size = config.table_size;
    if table_size == 0 {
        return None;
    }
    let slot = meta
        .table
        .wrapping_mul(table_size)
        .wrapping_add(maglev_slot(hash, table_size));
    let id = *MAGLEV.get(slot)?;
    let backend = usable(id)?;
    let entry = || ConnEntry {
        backend: id,
        vip_id: meta.vip_id,
        last_seen_ns: now(),
        flow_hash: hash,
        backend_tag: backend.tag,
        flags: 0,
    };
    match policy {
        ConnPolicy::New => conntrack::overwrite(flow, entry),
        ConnPolicy::Track | ConnPolicy::TrackIdle => {
            let entry = entry();
            if insert_allowed(config.conntrack_inserts_per_window, entry.last_seen_ns) {
                conntrack::record(flow, &entry);
            } else {
                stats.conntrack_insert_skipped += 1;
            }
        }
        ConnPolicy::LookupOnly | ConnPolicy::EgressOnly | ConnPolicy::Stateless => {}
    }
    stats.conntrack_miss += 1;
    Some(Choice { id, backend, hash })
}

/// The owner of the egress block `flow`'s destination port falls in: replies to connections
/// that a backend opened with the VIP as source. No conntrack and no hash: the agent wrote the
/// same owner table on every LB node. `Err` says what becomes of the packet otherwise: a port
/// outside the range (or a packet that is not egress traffic at all) passes, a block without
/// an owner (free, or resting after its backend left) is dropped.
#[inline(always)]
pub(crate) fn egress(meta: &VipMeta, flow: &FlowKey) -> Result<Choice, Outcome> {
    let block = meta
        .egress_block(u16::from_be_bytes(flow.dst_port))
        .ok_or(Outcome::Passed)?;
    let table_size = DATAPATH_CONFIG.get(0).ok_or(Outcome::Passed)?.table_size;
    let slot = meta.table.wrapping_mul(table_size).wrapping_add(block);
    let id = *MAGLEV.get(slot).ok_or(Outcome::DropNoBackend)?;
    let backend = usable(id).ok_or(Outcome::DropNoBackend)?;
    Ok(Choice {
        id,
        backend,
        hash: flow_hash(flow, u32::MAX),
    })
}

/// Whether this CPU may make another conntrack entry in the window of `now_ns`.
#[inline(always)]
fn insert_allowed(per_window: u32, now_ns: u64) -> bool {
    if per_window == 0 {
        return true;
    }
    let Some(budget) = INSERT_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's copy of a per-CPU array entry; XDP runs with preemption disabled.
    let budget = unsafe { &mut *budget };
    let window = now_ns >> INSERT_WINDOW_SHIFT;
    if budget.window != window {
        budget.window = window;
        budget.used = 0;
    }
    if budget.used >= per_window {
        return false;
    }
    budget.used += 1;
    true
}

/// Adds one packet of `bytes` to the backend's counters. Backend ids are per VIP, so the agent
/// sums a VIP's traffic from its backends' instead of every packet updating a second counter.
#[inline(always)]
pub(crate) fn count_traffic(id: BackendId, bytes: u16) {
    if let Some(counters) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: this CPU's copy of a per-CPU array entry; nothing else writes it concurrently.
        let counters: &mut TrafficCounters = unsafe { &mut *counters };
        counters.packets += 1;
        counters.bytes += u64::from(bytes);
    }
}
