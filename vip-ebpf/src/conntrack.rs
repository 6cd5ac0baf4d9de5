//! Connection tracking: the shared LRU maps (`CONNTRACK_V4`, `CONNTRACK`), and for IPv4 this
//! CPU's flow cache in front of them.
//!
//! A lookup in an LRU hash map is a chain of kernel calls (hash, bucket walk, key compare) and
//! cost an established packet about as much as everything else it does. The flow cache is a
//! per-CPU array indexed by a hash of the flow: a hit is an inlined array read and a 16-byte
//! compare. The LRU map stays the one record every CPU and the agent see; the cache holds
//! copies, each re-read from the LRU map at least every `REFRESH_JIFFIES`, which also keeps the
//! flow recently used in the LRU map's eyes (a flow served only from a cache would otherwise
//! age out of it while active), and is when a UDP flow's idle time is checked and renewed, in
//! the LRU map's entry. Per CPU, so a slot is never written by two CPUs at once and never read
//! half-written; flows stay on one CPU anyway (RSS hashes the same 5-tuple).

use aya_ebpf::{
    btf_maps::PerCpuArray,
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::btf_map,
};
use vip_common::{AddrFamily, ConnEntry, FlowKey, FlowKeyV4};

use crate::maps::{CONNTRACK, CONNTRACK_V4};

/// Slots of the flow cache per CPU (a power of two): 8,192 × 48 bytes = 384 KiB per CPU.
const CACHE_SLOTS: u32 = 1 << 13;

/// How long a cached entry is used before it is read again from the LRU map, in jiffies:
/// 32 is 32 ms at HZ=1000 and 320 ms at HZ=100, under the shortest UDP idle timeout the agent
/// accepts (1 s: a UDP flow that moves to another CPU finds its shared entry fresh) and short
/// against the time an active flow takes to age out of a busy LRU map.
const REFRESH_JIFFIES: u64 = 32;

/// A slot of `FLOW_CACHE_V4`: a copy of a `CONNTRACK_V4` entry. An all-zero key (protocol 0)
/// never matches a flow: the slot is empty.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct FlowCacheSlot {
    key: FlowKeyV4,
    entry: ConnEntry,
    /// `bpf_jiffies64` when the entry was last read from (or written to) the LRU map.
    checked_jiffies: u64,
}

/// This CPU's copies of recently used `CONNTRACK_V4` entries, by `cache_slot` of the flow.
/// Not pinned: a new program starts with an empty cache.
#[btf_map]
static FLOW_CACHE_V4: PerCpuArray<FlowCacheSlot, { CACHE_SLOTS as usize }> = PerCpuArray::new();

/// The flow's slot in the flow cache: a multiplicative hash of the key's words. Collisions only
/// cost a lookup in the LRU map.
#[inline(always)]
fn cache_slot(key: &FlowKeyV4) -> Option<&'static mut FlowCacheSlot> {
    let [src, dst, ports, proto]: [u32; 4] = bytemuck::cast(*key);
    let mixed = src ^ dst.rotate_left(11) ^ ports.rotate_left(19) ^ proto;
    let index = mixed.wrapping_mul(0x9e37_79b1) >> (32 - CACHE_SLOTS.trailing_zeros());
    // SAFETY: this CPU's copy of a per-CPU array entry; XDP runs with preemption disabled, so
    // nothing else reads or writes it until this program returns.
    FLOW_CACHE_V4.get_ptr_mut(index).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn same(a: &FlowKeyV4, b: &FlowKeyV4) -> bool {
    bytemuck::cast::<_, [u32; 4]>(*a) == bytemuck::cast::<_, [u32; 4]>(*b)
}

#[inline(always)]
fn jiffies() -> u64 {
    // SAFETY: plain helper call without arguments; the verifier inlines it as a memory read.
    unsafe { bpf_jiffies64() }
}

/// The clock of `ConnEntry::last_seen_ns`.
#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: plain helper call without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A flow's conntrack entry as [`entry`] found it.
pub(crate) struct Tracked {
    pub entry: &'static mut ConnEntry,
    /// `entry` is the LRU map's own, read for this packet (always for IPv6; for IPv4 when the
    /// cached copy was missing or stale), not this CPU's copy: `last_seen_ns` is kept there.
    pub shared: bool,
}

/// The conntrack entry of `flow`: for IPv4 this CPU's cached copy, re-read from
/// `CONNTRACK_V4` (and the copy renewed) when stale; for IPv6 the `CONNTRACK` entry.
#[inline(always)]
pub(crate) fn entry(flow: &FlowKey) -> Option<Tracked> {
    if flow.family != AddrFamily::V4 as u8 {
        // SAFETY: a map value pointer stays valid for this program run; racing writers of the
        // same flow on other CPUs can only store another valid backend id or time.
        let entry = unsafe { &mut *CONNTRACK.get_ptr_mut(flow)? };
        return Some(Tracked {
            entry,
            shared: true,
        });
    }
    let key = FlowKeyV4::of(flow);
    let slot = cache_slot(&key)?;
    let now = jiffies();
    if same(&slot.key, &key) && now.wrapping_sub(slot.checked_jiffies) < REFRESH_JIFFIES {
        return Some(Tracked {
            entry: &mut slot.entry,
            shared: false,
        });
    }
    // SAFETY: as above.
    let entry = unsafe { &mut *CONNTRACK_V4.get_ptr_mut(key)? };
    *slot = FlowCacheSlot {
        key,
        entry: *entry,
        checked_jiffies: now,
    };
    Some(Tracked {
        entry,
        shared: true,
    })
}

/// Replaces the entry of `flow` where there is one (a reused 5-tuple: its next packets must
/// follow the new connection), in the LRU map and in this CPU's cache. `entry` is only made
/// when there is one to replace (it reads the clock), and once.
#[inline(always)]
pub(crate) fn overwrite(flow: &FlowKey, entry: impl Fn() -> ConnEntry) {
    if flow.family != AddrFamily::V4 as u8 {
        if let Some(old) = CONNTRACK.get_ptr_mut(flow) {
            // SAFETY: a map value pointer stays valid for this program run.
            unsafe { *old = entry() };
        }
        return;
    }
    let key = FlowKeyV4::of(flow);
    let shared = CONNTRACK_V4.get_ptr_mut(key);
    let cached = cache_slot(&key).filter(|slot| same(&slot.key, &key));
    if shared.is_none() && cached.is_none() {
        return;
    }
    let new = entry();
    if let Some(old) = shared {
        // SAFETY: as above.
        unsafe { *old = new };
    }
    if let Some(slot) = cached {
        slot.entry = new;
        slot.checked_jiffies = jiffies();
    }
}

/// Records `flow`'s entry. A full LRU evicts its oldest entry; an error here only costs the
/// next packet a re-hash, which picks the same backend while the table is unchanged.
#[inline(always)]
pub(crate) fn record(flow: &FlowKey, entry: &ConnEntry) {
    if flow.family != AddrFamily::V4 as u8 {
        let _ = CONNTRACK.insert(flow, entry, 0);
        return;
    }
    let key = FlowKeyV4::of(flow);
    if CONNTRACK_V4.insert(key, entry, 0).is_ok()
        && let Some(slot) = cache_slot(&key)
    {
        *slot = FlowCacheSlot {
            key,
            entry: *entry,
            checked_jiffies: jiffies(),
        };
    }
}
