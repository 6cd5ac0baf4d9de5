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

/// Slots of the IPv4 flow cache per CPU (a power of two): 8,192 × 48 bytes = 384 KiB per CPU.
const CACHE_SLOTS_V4: u32 = 1 << 13;

/// Slots of the IPv6 flow cache per CPU (a power of two): 4,096 × 80 bytes = 320 KiB per CPU.
const CACHE_SLOTS_V6: u32 = 1 << 12;

/// How long a cached entry is used before it is read again from the LRU map, in jiffies:
/// 32 is 32 ms at HZ=1000 and 320 ms at HZ=100, under the shortest UDP idle timeout the agent
/// accepts (1 s: a UDP flow that moves to another CPU finds its shared entry fresh) and short
/// against the time an active flow takes to age out of a busy LRU map.
const REFRESH_JIFFIES: u64 = 32;

/// A slot of a flow cache: a copy of a conntrack entry. An all-zero key (protocol 0) never
/// matches a flow: the slot is empty.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct FlowCacheSlot<K> {
    key: K,
    entry: ConnEntry,
    /// `bpf_jiffies64` when the entry was last read from (or written to) the LRU map.
    checked_jiffies: u64,
}

impl<K: Copy> FlowCacheSlot<K> {
    /// Field by field, from where they are: a whole slot built first would take stack the
    /// program does not have.
    #[inline(always)]
    fn fill(&mut self, key: &K, entry: &ConnEntry, now: u64) {
        self.key = *key;
        self.entry = *entry;
        self.checked_jiffies = now;
    }
}

/// This CPU's copies of recently used `CONNTRACK_V4` entries, by `Cached::slot` of the flow.
/// Not pinned: a new program starts with an empty cache.
#[btf_map]
static FLOW_CACHE_V4: PerCpuArray<FlowCacheSlot<FlowKeyV4>, { CACHE_SLOTS_V4 as usize }> =
    PerCpuArray::new();

/// As `FLOW_CACHE_V4`, of `CONNTRACK` entries.
#[btf_map]
static FLOW_CACHE_V6: PerCpuArray<FlowCacheSlot<FlowKey>, { CACHE_SLOTS_V6 as usize }> =
    PerCpuArray::new();

/// A conntrack key with a flow cache in front of its LRU map.
trait Cached: Copy + 'static {
    /// The flow's slot in this CPU's cache. Collisions only cost a lookup in the LRU map.
    fn slot(&self) -> Option<&'static mut FlowCacheSlot<Self>>;
    /// Word by word: LLVM would compare byte arrays byte by byte.
    fn same(&self, other: &Self) -> bool;
    /// The LRU map's entry.
    fn shared(&self) -> Option<*mut ConnEntry>;
    fn insert(&self, entry: &ConnEntry) -> bool;
}

/// A multiplicative hash of a key's words to `bits` bits.
#[inline(always)]
fn slot_index(mixed: u32, bits: u32) -> u32 {
    mixed.wrapping_mul(0x9e37_79b1) >> (32 - bits)
}

/// SAFETY for both caches' slots: this CPU's copy of a per-CPU array entry; XDP runs with
/// preemption disabled, so nothing else reads or writes it until this program returns.
impl Cached for FlowKeyV4 {
    #[inline(always)]
    fn slot(&self) -> Option<&'static mut FlowCacheSlot<Self>> {
        let [src, dst, ports, proto]: [u32; 4] = bytemuck::cast(*self);
        let mixed = src ^ dst.rotate_left(11) ^ ports.rotate_left(19) ^ proto;
        let index = slot_index(mixed, CACHE_SLOTS_V4.trailing_zeros());
        // SAFETY: see above.
        FLOW_CACHE_V4.get_ptr_mut(index).map(|p| unsafe { &mut *p })
    }

    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        bytemuck::cast::<_, [u32; 4]>(*self) == bytemuck::cast::<_, [u32; 4]>(*other)
    }

    #[inline(always)]
    fn shared(&self) -> Option<*mut ConnEntry> {
        CONNTRACK_V4.get_ptr_mut(self)
    }

    #[inline(always)]
    fn insert(&self, entry: &ConnEntry) -> bool {
        CONNTRACK_V4.insert(self, entry, 0).is_ok()
    }
}

impl Cached for FlowKey {
    #[inline(always)]
    fn slot(&self) -> Option<&'static mut FlowCacheSlot<Self>> {
        let src = word(self, 0) ^ word(self, 1) ^ word(self, 2) ^ word(self, 3);
        let dst = word(self, 4) ^ word(self, 5) ^ word(self, 6) ^ word(self, 7);
        let mixed = src ^ dst.rotate_left(11) ^ word(self, 8).rotate_left(19) ^ word(self, 9);
        let index = slot_index(mixed, CACHE_SLOTS_V6.trailing_zeros());
        // SAFETY: see above.
        FLOW_CACHE_V6.get_ptr_mut(index).map(|p| unsafe { &mut *p })
    }

    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        (0..10).all(|i| word(self, i) == word(other, i))
    }

    #[inline(always)]
    fn shared(&self) -> Option<*mut ConnEntry> {
        CONNTRACK.get_ptr_mut(self)
    }

    #[inline(always)]
    fn insert(&self, entry: &ConnEntry) -> bool {
        CONNTRACK.insert(self, entry, 0).is_ok()
    }
}

/// Word `i` of an IPv6 key, read whole (the program allows misaligned loads). One at a time:
/// the key copied as one array would take stack the program does not have.
#[inline(always)]
fn word(key: &FlowKey, i: usize) -> u32 {
    // SAFETY: `FlowKey` is 40 bytes of plain data and `i` < 10 at every call site.
    unsafe {
        core::ptr::from_ref(key)
            .cast::<u8>()
            .add(i * 4)
            .cast::<u32>()
            .read_unaligned()
    }
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
    /// `entry` is the LRU map's own, read for this packet (the cached copy was missing or
    /// stale), not this CPU's copy: `last_seen_ns` is kept there.
    pub shared: bool,
}

/// The conntrack entry of `flow`: this CPU's cached copy, re-read from the LRU map (and the
/// copy renewed) when stale.
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
        });
    }
    // SAFETY: a map value pointer stays valid for this program run; racing writers of the
    // same flow on other CPUs can only store another valid backend id or time.
    let entry = unsafe { &mut *key.shared()? };
    slot.fill(key, entry, now);
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
    if flow.family == AddrFamily::V4 as u8 {
        overwrite_cached(&FlowKeyV4::of(flow), entry);
    } else {
        overwrite_cached(flow, entry);
    }
}

#[inline(always)]
fn overwrite_cached<K: Cached>(key: &K, entry: impl Fn() -> ConnEntry) {
    let shared = key.shared();
    let cached = key.slot().filter(|slot| slot.key.same(key));
    if shared.is_none() && cached.is_none() {
        return;
    }
    let new = entry();
    if let Some(old) = shared {
        // SAFETY: a map value pointer stays valid for this program run.
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
    if flow.family == AddrFamily::V4 as u8 {
        record_cached(&FlowKeyV4::of(flow), entry);
    } else {
        record_cached(flow, entry);
    }
}

#[inline(always)]
fn record_cached<K: Cached>(key: &K, entry: &ConnEntry) {
    if key.insert(entry)
        && let Some(slot) = key.slot()
    {
        slot.fill(key, entry, jiffies());
    }
}
