//! Connection tracking: the shared tables (`CT_TABLE_V4`, `CT_TABLE_V6`; their layout and
//! lookup are `vip_common::conntrack`'s), and this CPU's flow cache in front of them.
//!
//! A table read hashes the key, reads its bucket and checks the way it finds. The flow cache is
//! a per-CPU array indexed by another hash of the flow: a hit is an inlined array read and a
//! compare of the key's words, with no check (nothing else writes this CPU's slots). The table
//! stays the one record every CPU and the agent see; the cache holds copies, each re-read from
//! the table at least every `REFRESH_JIFFIES`, which is when the table's entry is marked used
//! (a flow served only from a cache would otherwise be the first evicted from its bucket while
//! active) and a UDP flow's idle time is checked. Flows stay on one CPU anyway (RSS hashes the
//! same 5-tuple).

use aya_ebpf::{
    btf_maps::PerCpuArray,
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::btf_map,
};
use vip_common::{
    AddrFamily, ConnEntry, FlowKey, FlowKeyV4,
    conntrack::{ConntrackBucket, ConntrackKey, ConntrackWay},
};

use crate::{
    maps::{CT_TABLE_V4, CT_TABLE_V6, conntrack_bucket_bits},
    replay::Replay,
};

/// Slots of the IPv4 flow cache per CPU (a power of two): 2,048 × 144 bytes = 288 KiB per CPU.
const CACHE_SLOTS_V4: u32 = 1 << 11;

/// Slots of the IPv6 flow cache per CPU (a power of two): 2,048 × 168 bytes = 336 KiB per CPU.
const CACHE_SLOTS_V6: u32 = 1 << 11;

/// How long a cached entry is used before it is read again from the table, in jiffies: 32 is
/// 32 ms at HZ=1000 and 320 ms at HZ=100, under the shortest UDP idle timeout the agent accepts
/// (1 s: a UDP flow that moves to another CPU finds its shared entry fresh) and short against
/// the time a flow's bucket-mates take to make it the least recently used of its bucket.
const REFRESH_JIFFIES: u64 = 32;

/// A slot of a flow cache: a copy of a conntrack entry. An all-zero key (protocol 0) never
/// matches a flow: the slot is empty.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct FlowCacheSlot<K> {
    key: K,
    entry: ConnEntry,
    /// `bpf_jiffies64` when the entry was last read from (or written to) the table.
    checked_jiffies: u64,
    /// The headers the flow's last packet left with, while they hold (see `replay`).
    replay: Replay,
}

impl<K: Copy> FlowCacheSlot<K> {
    /// Field by field, from where they are: a whole slot built first would take stack the
    /// program does not have.
    #[inline(always)]
    fn fill(&mut self, key: &K, entry: &ConnEntry, now: u64) {
        self.key = *key;
        self.entry = *entry;
        self.checked_jiffies = now;
        self.replay.clear();
    }
}

/// This CPU's copies of recently used `CT_TABLE_V4` entries, by `Cached::slot` of the flow.
/// Not pinned: a new program starts with an empty cache.
#[btf_map]
static FLOW_CACHE_V4: PerCpuArray<FlowCacheSlot<FlowKeyV4>, { CACHE_SLOTS_V4 as usize }> =
    PerCpuArray::new();

/// As `FLOW_CACHE_V4`, of `CT_TABLE_V6` entries.
#[btf_map]
static FLOW_CACHE_V6: PerCpuArray<FlowCacheSlot<FlowKey>, { CACHE_SLOTS_V6 as usize }> =
    PerCpuArray::new();

/// A conntrack key: its table, and a flow cache in front of it.
trait Cached: ConntrackKey + 'static {
    /// The flow's slot in this CPU's cache. Collisions only cost a read of the table.
    fn slot(&self) -> Option<&'static mut FlowCacheSlot<Self>>;
    /// The flow's bucket in the shared table.
    fn table_bucket(&self) -> Option<&'static mut ConntrackBucket<Self>>;
}

/// A multiplicative hash of a key's words to `bits` bits.
#[inline(always)]
fn slot_index(mixed: u32, bits: u32) -> u32 {
    mixed.wrapping_mul(0x9e37_79b1) >> (32 - bits)
}

/// SAFETY for both caches' slots: this CPU's copy of a per-CPU array entry; XDP runs with
/// preemption disabled, so nothing else reads or writes it until this program returns. For
/// both tables' buckets: a map value pointer stays valid for this program run; other CPUs and
/// the agent may write the same bucket meanwhile, which the ways' check words detect.
impl Cached for FlowKeyV4 {
    #[inline(always)]
    fn slot(&self) -> Option<&'static mut FlowCacheSlot<Self>> {
        let index = slot_index(self.mix(), CACHE_SLOTS_V4.trailing_zeros());
        // SAFETY: see above.
        FLOW_CACHE_V4.get_ptr_mut(index).map(|p| unsafe { &mut *p })
    }

    #[inline(always)]
    fn table_bucket(&self) -> Option<&'static mut ConntrackBucket<Self>> {
        let index = self.bucket(conntrack_bucket_bits());
        // SAFETY: see above.
        CT_TABLE_V4.get_ptr_mut(index).map(|p| unsafe { &mut *p })
    }
}

impl Cached for FlowKey {
    #[inline(always)]
    fn slot(&self) -> Option<&'static mut FlowCacheSlot<Self>> {
        let index = slot_index(self.mix(), CACHE_SLOTS_V6.trailing_zeros());
        // SAFETY: see above.
        FLOW_CACHE_V6.get_ptr_mut(index).map(|p| unsafe { &mut *p })
    }

    #[inline(always)]
    fn table_bucket(&self) -> Option<&'static mut ConntrackBucket<Self>> {
        let index = self.bucket(conntrack_bucket_bits());
        // SAFETY: see above.
        CT_TABLE_V6.get_ptr_mut(index).map(|p| unsafe { &mut *p })
    }
}

/// The way of the shared table holding `key`'s entry.
#[inline(always)]
fn shared<K: Cached>(key: &K) -> Option<&'static mut ConntrackWay<K>> {
    let bucket = key.table_bucket()?;
    let way = bucket.position(key)?;
    bucket.ways.get_mut(way)
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
    /// `entry` is the table's own, read for this packet (the cached copy was missing or
    /// stale), not this CPU's copy: `last_seen_ns` is kept there.
    pub shared: bool,
    /// The flow's recorded headers in this CPU's cache (none after a read of the table).
    pub replay: &'static mut Replay,
}

/// The conntrack entry of `flow`: this CPU's cached copy, re-read from the table (and the copy
/// renewed) when stale.
#[inline(always)]
pub(crate) fn entry(flow: &FlowKey) -> Option<Tracked> {
    if flow.family == AddrFamily::V4 as u8 {
        cached_entry(&FlowKeyV4::of(flow))
    } else {
        cached_entry(flow)
    }
}

#[inline(always)]
fn cached_entry<K: Cached>(key: &K) -> Option<Tracked> {
    let slot = key.slot()?;
    let now = jiffies();
    if slot.key.same(key) && now.wrapping_sub(slot.checked_jiffies) < REFRESH_JIFFIES {
        return Some(Tracked {
            entry: &mut slot.entry,
            shared: false,
            replay: &mut slot.replay,
        });
    }
    let way = shared(key)?;
    slot.fill(key, &way.entry, now);
    Some(Tracked {
        entry: &mut way.entry,
        shared: true,
        replay: &mut slot.replay,
    })
}

/// Replaces the entry of `flow` where there is one (a reused 5-tuple: its next packets must
/// follow the new connection), in the table and in this CPU's cache. `entry` is only made
/// when there is one to replace (it reads the clock), and once.
#[inline(always)]
pub(crate) fn overwrite(flow: &FlowKey, entry: impl Fn() -> ConnEntry) {
    if flow.family == AddrFamily::V4 as u8 {
        overwrite_cached(&FlowKeyV4::of(flow), entry);
    } else {
        overwrite_cached(flow, entry);
    }
}

#[inline(always)]
fn overwrite_cached<K: Cached>(key: &K, entry: impl Fn() -> ConnEntry) {
    let shared = shared(key);
    let cached = key.slot().filter(|slot| slot.key.same(key));
    if shared.is_none() && cached.is_none() {
        return;
    }
    let new = entry();
    if let Some(way) = shared {
        way.set_entry(&new);
    }
    if let Some(slot) = cached {
        slot.entry = new;
        slot.checked_jiffies = jiffies();
        slot.replay.clear();
    }
}

/// Records `flow`'s entry, in the way of its bucket that held the flow or was least recently
/// used, and in this CPU's cache.
#[inline(always)]
pub(crate) fn record(flow: &FlowKey, entry: &ConnEntry) {
    if flow.family == AddrFamily::V4 as u8 {
        record_cached(&FlowKeyV4::of(flow), entry);
    } else {
        record_cached(flow, entry);
    }
}

#[inline(always)]
fn record_cached<K: Cached>(key: &K, entry: &ConnEntry) {
    let Some(bucket) = key.table_bucket() else {
        return;
    };
    let victim = bucket.victim(key);
    let Some(way) = bucket.ways.get_mut(victim) else {
        return;
    };
    way.fill(key, entry);
    if let Some(slot) = key.slot() {
        slot.fill(key, entry, jiffies());
    }
}
