//! The conntrack tables: `CT_TABLE_V4` and `CT_TABLE_V6`, set-associative hash tables in array
//! maps that the datapath and the agent both read and write.
//!
//! A flow's key picks one [`ConntrackBucket`] ([`ConntrackKey::bucket`]); the bucket has
//! [`CONNTRACK_WAYS`] ways, and the flow's entry is in one of them or nowhere. A lookup reads
//! one bucket (a few cache lines) and compares at most four keys; a new flow replaces the way
//! holding its key, else the least recently used of the four ([`ConntrackBucket::victim`]).
//! The kernel's LRU hash map, which this replaces, touched several cold lines per new flow
//! (bucket, element, LRU list neighbours, the evicted element's bucket): docs/conntrack.md.
//!
//! No lock: two CPUs (or a CPU and the agent) may write one way at once, and a reader may see
//! half a write. Every way carries a check word over its key and entry
//! ([`ConntrackWay::intact`]); a way whose words do not all come from one write fails it and
//! reads as empty, so a torn way costs its flow a Maglev answer, never another flow's backend.
//! The check holds whatever order the stores land in: it is a function of the content.
//!
//! Both sides run this code: the datapath on the map's values, the agent on a shared mapping of
//! the same memory (`BPF_F_MMAPABLE`).

use bytemuck::{Pod, Zeroable};

use crate::maps::{ConnEntry, FlowKey, FlowKeyV4};

/// Ways per bucket: flows whose keys pick the same bucket; a fifth evicts one.
pub const CONNTRACK_WAYS: usize = 4;

/// The multiplier of [`ConntrackKey::bucket`]; the flow cache in front of the tables uses
/// another (`0x9e37_79b1`), so that flows sharing a bucket do not also share a cache slot.
const BUCKET_MULTIPLIER: u32 = 0x85eb_ca77;

/// A key of a conntrack table: [`FlowKeyV4`] (`CT_TABLE_V4`) or [`FlowKey`] (`CT_TABLE_V6`).
pub trait ConntrackKey: Pod {
    /// 32-bit words in the key.
    const WORDS: usize;

    /// Word `i` (< `WORDS`) of the key, native order, read where it is: the datapath has no
    /// stack for a copy, and loops over `0..WORDS` unroll.
    #[inline(always)]
    fn word(&self, i: usize) -> u32 {
        debug_assert!(i < Self::WORDS);
        // SAFETY: the key is `WORDS` 4-byte words of plain data, 4-byte aligned at least.
        unsafe { core::ptr::from_ref(self).cast::<u32>().add(i).read() }
    }

    /// As [`ConntrackKey::word`], read again at every call (volatile): see
    /// [`ConntrackWay::has_key`].
    #[inline(always)]
    fn word_volatile(&self, i: usize) -> u32 {
        debug_assert!(i < Self::WORDS);
        // SAFETY: as `word`.
        unsafe {
            core::ptr::from_ref(self)
                .cast::<u32>()
                .add(i)
                .read_volatile()
        }
    }

    /// The words folded into one, for the table's bucket and the flow cache's slot: a sum of
    /// products (the multiplies independent of each other), so that keys differing in a few
    /// structured ways (a subnet's clients, consecutive ports) do not fold to one value, as
    /// they do with xor and rotations; the top bits of a multiple of it spread.
    #[inline(always)]
    fn mix(&self) -> u32 {
        let mut sum = 0u32;
        for i in 0..Self::WORDS {
            sum = sum.wrapping_add(self.word(i).wrapping_mul(weight(i)));
        }
        sum
    }

    /// The bucket of a table of `2^bits` buckets (`bits` in 1..=31) holding this key.
    #[inline(always)]
    fn bucket(&self, bits: u32) -> u32 {
        self.mix().wrapping_mul(BUCKET_MULTIPLIER) >> (32 - bits)
    }

    /// Word by word: LLVM would compare the bytes one at a time.
    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        (0..Self::WORDS).all(|i| self.word(i) == other.word(i))
    }
}

impl ConntrackKey for FlowKeyV4 {
    const WORDS: usize = 4;
}

impl ConntrackKey for FlowKey {
    const WORDS: usize = 10;

    /// By 64-bit words: the key is 8-byte aligned, and an IPv6 flow-cache hit then compares
    /// five words instead of ten.
    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        let words = |key| bytemuck::cast_ref::<Self, [u64; 5]>(key);
        let (a, b) = (words(self), words(other));
        (0..5).all(|i| a[i] == b[i])
    }
}

const _: () =
    assert!(size_of::<FlowKeyV4>() == 4 * FlowKeyV4::WORDS && align_of::<FlowKeyV4>() >= 4);
const _: () = assert!(size_of::<FlowKey>() == 4 * FlowKey::WORDS && align_of::<FlowKey>() >= 4);

/// One way of a bucket: a flow and its entry, or nothing (a way whose check fails, such as an
/// all-zero one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackWay<K> {
    pub key: K,
    /// `last_seen_ns` is renewed in place on every shared read and is not covered by `check`;
    /// every other field is.
    pub entry: ConnEntry,
    /// [`check`] of `key` and `entry`, written after them; never 0.
    pub check: u32,
    pub _pad: u32,
}

/// A bucket: the value of the table's array map, by [`ConntrackKey::bucket`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackBucket<K> {
    pub ways: [ConntrackWay<K>; CONNTRACK_WAYS],
}

// SAFETY: `#[repr(C)]` over `Pod` fields, implemented for the two keys only, whose sizes (16
// and 40 bytes) are multiples of `ConnEntry`'s alignment (8): no padding anywhere (the
// assertions below check the sizes), and any bit pattern is a value.
unsafe impl Zeroable for ConntrackWay<FlowKeyV4> {}
// SAFETY: as above.
unsafe impl Pod for ConntrackWay<FlowKeyV4> {}
// SAFETY: as above.
unsafe impl Zeroable for ConntrackWay<FlowKey> {}
// SAFETY: as above.
unsafe impl Pod for ConntrackWay<FlowKey> {}
// SAFETY: an array of `Pod` ways.
unsafe impl Zeroable for ConntrackBucket<FlowKeyV4> {}
// SAFETY: as above.
unsafe impl Pod for ConntrackBucket<FlowKeyV4> {}
// SAFETY: as above.
unsafe impl Zeroable for ConntrackBucket<FlowKey> {}
// SAFETY: as above.
unsafe impl Pod for ConntrackBucket<FlowKey> {}

const _: () = assert!(size_of::<ConntrackWay<FlowKeyV4>>() == 16 + 24 + 8);
const _: () = assert!(size_of::<ConntrackWay<FlowKey>>() == 40 + 24 + 8);

/// Odd multipliers, one per word a check covers (14 for an IPv6 way): a sum of products, so
/// the multiplies are independent of each other, and a change to any one word changes the
/// sum (an odd multiplier is invertible modulo 2^32).
#[inline(always)]
const fn weight(i: usize) -> u32 {
    0x9e37_79b1_u32.wrapping_add((i as u32).wrapping_mul(0x7f4a_7c16))
}

/// The check word of a way holding `key` and `entry`: a words' weighted sum, finished so it is
/// never 0 (an empty way). A mix of two writes passes only by a 1-in-2^31 accident.
#[inline(always)]
pub fn check<K: ConntrackKey>(key: &K, entry: &ConnEntry) -> u32 {
    let n = K::WORDS;
    let tag_flags = u32::from(entry.backend_tag) | (u32::from(entry.flags) << 16);
    let sum = key
        .mix()
        .wrapping_add(entry.backend.wrapping_mul(weight(n)))
        .wrapping_add(entry.vip_id.wrapping_mul(weight(n + 1)))
        .wrapping_add(entry.flow_hash.wrapping_mul(weight(n + 2)))
        .wrapping_add(tag_flags.wrapping_mul(weight(n + 3)));
    (sum ^ (sum >> 15)) | 1
}

impl<K: ConntrackKey> ConntrackWay<K> {
    /// Whether the way's words all come from one write.
    #[inline(always)]
    pub fn intact(&self) -> bool {
        self.check == check(&self.key, &self.entry)
    }

    /// Whether the way holds `key`'s entry.
    #[inline(always)]
    pub fn holds(&self, key: &K) -> bool {
        self.has_key(key) && self.intact()
    }

    /// Whether the way's key is `key` (whole or torn). `key` is read word by word as compared,
    /// volatile: over a bucket's unrolled ways LLVM would otherwise load its words once and
    /// spill them, past the datapath's 512-byte stack (544 bytes measured for IPv6 keys).
    #[inline(always)]
    pub fn has_key(&self, key: &K) -> bool {
        for i in 0..K::WORDS {
            if self.key.word(i) != key.word_volatile(i) {
                return false;
            }
        }
        true
    }

    /// Writes `key` and `entry`, the check last.
    #[inline(always)]
    pub fn fill(&mut self, key: &K, entry: &ConnEntry) {
        self.key = *key;
        self.entry = *entry;
        self.check = check(key, entry);
    }

    /// Replaces the entry of the key the way holds.
    #[inline(always)]
    pub fn set_entry(&mut self, entry: &ConnEntry) {
        self.entry = *entry;
        self.check = check(&self.key, entry);
    }
}

/// Loops over a bucket's ways count an index: a walk by pointer to the array's end, which is
/// what iterators compile to when LLVM does not unroll them, has no bound the verifier can see.
impl<K: ConntrackKey> ConntrackBucket<K> {
    /// The way holding `key`'s entry.
    #[inline(always)]
    #[expect(
        clippy::manual_find,
        reason = "`Iterator::find` compiles to a BPF subprogram here, not inline"
    )]
    pub fn position(&self, key: &K) -> Option<usize> {
        for i in 0..CONNTRACK_WAYS {
            if self.ways.get(i).is_some_and(|way| way.holds(key)) {
                return Some(i);
            }
        }
        None
    }

    /// The way a new entry for `key` goes to: the one with `key` already (whole or torn), else
    /// the least recently used (an empty way has `last_seen_ns` 0).
    #[inline(always)]
    pub fn victim(&self, key: &K) -> usize {
        let mut victim = 0;
        let mut oldest = u64::MAX;
        for i in 0..CONNTRACK_WAYS {
            let Some(way) = self.ways.get(i) else {
                break;
            };
            if way.has_key(key) {
                return i;
            }
            if way.entry.last_seen_ns < oldest {
                oldest = way.entry.last_seen_ns;
                victim = i;
            }
        }
        victim
    }
}

/// The `2^bits` buckets of a table holding at least `entries` flows: the agent's sizing, and
/// the `CONNTRACK_BUCKET_BITS` it sets in the datapath.
pub fn bucket_bits(entries: u32) -> u32 {
    (entries.div_ceil(CONNTRACK_WAYS as u32))
        .next_power_of_two()
        .trailing_zeros()
        .max(1)
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: `Pod` (above).
    unsafe impl aya::Pod for ConntrackBucket<FlowKeyV4> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConntrackBucket<FlowKey> {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(backend: u32) -> ConnEntry {
        ConnEntry {
            backend,
            vip_id: 3,
            last_seen_ns: 100,
            flow_hash: 0xdead_beef,
            backend_tag: 7,
            flags: 0,
        }
    }

    fn flow(port: u16) -> FlowKey {
        let mut flow = FlowKey::v6([0xfd; 16], [0xfe; 16], 6);
        flow.set_ports(port.to_be_bytes(), [0, 80]);
        flow
    }

    #[test]
    fn keys_are_the_same_only_when_every_byte_is() {
        let key = flow(40_000);
        assert!(key.same(&key.clone()));
        for at in 0..size_of::<FlowKey>() {
            let mut other = key;
            bytemuck::bytes_of_mut(&mut other)[at] ^= 1;
            assert!(!key.same(&other), "byte {at} differs");
        }
    }

    #[test]
    fn a_way_holds_its_own_key_and_a_mix_of_two_writes_holds_none() {
        let mut way = ConntrackWay::<FlowKey>::zeroed();
        assert!(!way.intact(), "an all-zero way is empty");
        way.fill(&flow(1), &entry(1));
        assert!(way.holds(&flow(1)) && !way.holds(&flow(2)));
        way.entry.last_seen_ns = 5;
        assert!(way.holds(&flow(1)), "the clock is outside the check");
        // Another write's key or entry over this one's check: every field the check covers.
        let mut torn = way;
        torn.key = flow(2);
        assert!(!torn.holds(&flow(2)));
        for change in [
            |e: &mut ConnEntry| e.backend = 2,
            |e: &mut ConnEntry| e.vip_id = 4,
            |e: &mut ConnEntry| e.flow_hash = 1,
            |e: &mut ConnEntry| e.backend_tag = 8,
            |e: &mut ConnEntry| e.flags = 1,
        ] {
            let mut torn = way;
            change(&mut torn.entry);
            assert!(!torn.intact(), "{torn:?}");
        }
        way.set_entry(&entry(9));
        assert!(way.holds(&flow(1)));
        assert_eq!(way.entry.backend, 9);
    }

    #[test]
    fn a_new_flow_takes_its_own_way_else_the_least_recently_used() {
        let mut bucket = ConntrackBucket::<FlowKeyV4>::zeroed();
        let key = |port: u16| {
            FlowKeyV4::of(&{
                let mut f = FlowKey::v4([198, 18, 0, 1], [198, 19, 0, 1], 6);
                f.src_port = port.to_be_bytes();
                f
            })
        };
        for (i, seen) in [(0, 40), (1, 10), (2, 30), (3, 20)] {
            let mut e = entry(i as u32);
            e.last_seen_ns = seen;
            bucket.ways[i].fill(&key(i as u16), &e);
        }
        assert_eq!(bucket.position(&key(2)), Some(2));
        assert_eq!(bucket.position(&key(9)), None);
        assert_eq!(bucket.victim(&key(9)), 1, "least recently used");
        assert_eq!(bucket.victim(&key(3)), 3, "its own way");
    }

    #[test]
    fn buckets_spread_keys_and_tables_are_sized_up_to_a_power_of_two() {
        assert_eq!(bucket_bits(262_144), 16);
        assert_eq!(bucket_bits(1_000), 8);
        assert_eq!(bucket_bits(1), 1);
        // A subnet's clients on a few ports each, as real traffic and the tests have it: 4 keys
        // a bucket on average, and no pile-up (Poisson: 13 or more in any of 1,024 buckets
        // about once in 5 tries at random; structured keys folded by xor put dozens in one).
        let bits = 10;
        let spread = |key: &dyn Fn(u32) -> u32| {
            let mut counts = [0u32; 1 << 10];
            for i in 0..4096 {
                counts[key(i) as usize] += 1;
            }
            counts.into_iter().max().unwrap()
        };
        let v4 = |i: u32| {
            let mut f = FlowKey::v4(
                [198, 18, 128 + (i / 250) as u8, 1 + (i % 250) as u8],
                [198, 18, 100, 1],
                6,
            );
            f.src_port = (1_024 + (i % 7) as u16).to_be_bytes();
            f
        };
        assert!(spread(&|i| FlowKeyV4::of(&v4(i)).bucket(bits)) <= 12);
        let v6 = |i: u32| {
            let mut src = [0xfd, 0, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            src[12..].copy_from_slice(&(i / 4).to_be_bytes());
            let mut f = FlowKey::v6(src, [0xfd; 16], 6);
            f.src_port = (40_000 + (i % 4) as u16).to_be_bytes();
            f
        };
        assert!(spread(&|i| v6(i).bucket(bits)) <= 12);
        assert!(v4(9).bucket(bits) < 1 << bits && v6(9).bucket(bits) < 1 << bits);
    }
}
