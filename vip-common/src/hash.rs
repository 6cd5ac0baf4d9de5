//! The flow hash: which Maglev slot a flow lands in.
//!
//! Every LB node must pick the same backend for the same flow, or a flow that ECMP moves to another
//! node breaks. So the hash has a fixed seed and no per-boot or per-node input, and the kernel and
//! the agent run this very function. It is a 64-bit multiply-xorshift over the five 8-byte words of
//! a [`FlowKey`](crate::FlowKey), finished with MurmurHash3's `fmix64` for avalanche: five
//! multiplies, no table, no loop the verifier must bound.

use crate::maps::FlowKey;

/// Fixed seed ("vip-lb26"). Changing it moves every flow on every node: never do it in place.
pub const FLOW_HASH_SEED: u64 = 0x7669_702d_6c62_3236;

const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
fn absorb(state: u64, word: u64) -> u64 {
    let x = (state ^ word).wrapping_mul(MULTIPLIER);
    x ^ (x >> 29)
}

#[inline(always)]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[inline(always)]
fn word(bytes: &[u8; 16], half: usize) -> u64 {
    let b = half * 8;
    u64::from_le_bytes([
        bytes[b],
        bytes[b + 1],
        bytes[b + 2],
        bytes[b + 3],
        bytes[b + 4],
        bytes[b + 5],
        bytes[b + 6],
        bytes[b + 7],
    ])
}

/// Hashes a flow. `port_mask` is `u32::MAX` to hash the full 5-tuple, or `0` for source-IP
/// affinity (addresses and protocol only), as the VIP's [`VipMeta::hash_port_mask`] says.
///
/// [`VipMeta::hash_port_mask`]: crate::VipMeta::hash_port_mask
#[inline(always)]
pub fn flow_hash(flow: &FlowKey, port_mask: u32) -> u32 {
    let ports = u32::from_le_bytes([
        flow.src_port[0],
        flow.src_port[1],
        flow.dst_port[0],
        flow.dst_port[1],
    ]) & port_mask;
    let tail = (u64::from(ports) << 16) | (u64::from(flow.family) << 8) | u64::from(flow.proto);
    let mut h = FLOW_HASH_SEED;
    h = absorb(h, word(&flow.src, 0));
    h = absorb(h, word(&flow.src, 1));
    h = absorb(h, word(&flow.dst, 0));
    h = absorb(h, word(&flow.dst, 1));
    h = absorb(h, tail);
    let h = fmix64(h);
    (h ^ (h >> 32)) as u32
}

/// The Maglev slot of a flow hash in a table of `table_size` slots: `(hash * size) >> 32`, a
/// uniform map of 32-bit hashes onto `0..table_size` with one multiply. A `%` by a size known
/// only at run time costs the datapath a hardware divide on every packet.
#[inline(always)]
pub fn maglev_slot(hash: u32, table_size: u32) -> u32 {
    ((u64::from(hash) * u64::from(table_size)) >> 32) as u32
}

/// Bits in the VIP address filter (`VIP_FILTER`, 64-bit words).
pub const VIP_FILTER_BITS: u32 = 1 << 16;

/// The VIP address filter bit of a destination address (network-order bytes, IPv4 in 0..4):
/// the datapath passes a packet whose bit is clear without any hash map lookup. A multiply-shift
/// of the address folded to 32 bits: a few instructions, shared with the agent that sets bits.
#[inline(always)]
pub fn vip_filter_bit(addr: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_le_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    filter_bit(w(0) ^ w(4) ^ w(8) ^ w(12))
}

/// [`vip_filter_bit`] of an IPv4 address (whose other 12 bytes are zero).
#[inline(always)]
pub fn vip_filter_bit_v4(addr: [u8; 4]) -> u32 {
    filter_bit(u32::from_le_bytes(addr))
}

#[inline(always)]
fn filter_bit(folded: u32) -> u32 {
    folded.wrapping_mul(0x9e37_79b1) >> 16
}

/// A backend's tag (`Backend::tag`): a hash of its VIP and address, never 0.
pub fn backend_tag(vip: &crate::maps::VipKey, addr: &[u8; 16]) -> u16 {
    let service = [vip.proto, vip.family, vip.port[0], vip.port[1], 0, 0, 0, 0];
    let mut h = backend_hash(addr, u64::from_le_bytes(service));
    h = absorb(h, word(&vip.addr, 0));
    h = absorb(h, word(&vip.addr, 1));
    (fmix64(h) as u16).max(1)
}

/// Hashes a backend address for Maglev's permutation; `salt` separates the offset and skip hashes.
#[inline]
pub fn backend_hash(addr: &[u8; 16], salt: u64) -> u64 {
    let mut h = FLOW_HASH_SEED ^ salt;
    h = absorb(h, word(addr, 0));
    h = absorb(h, word(addr, 1));
    fmix64(h)
}

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_tags_tell_holders_of_an_id_apart() {
        let vip = |last: u8, port: u16| crate::maps::VipKey {
            addr: [198, 19, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: port.to_be_bytes(),
            proto: 6,
            family: 4,
        };
        let addr = |last: u8| [198, 18, 1, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut tags = std::collections::HashSet::new();
        for v in 0..20 {
            for port in [80, 443] {
                for a in 0..20 {
                    let tag = backend_tag(&vip(v, port), &addr(a));
                    assert_ne!(tag, 0);
                    tags.insert(tag);
                }
            }
        }
        // 800 (VIP, address) pairs in 65,535 tags: a handful of collisions at most.
        assert!(tags.len() > 790, "{} distinct tags of 800", tags.len());
        assert_eq!(
            backend_tag(&vip(1, 80), &addr(1)),
            backend_tag(&vip(1, 80), &addr(1))
        );
    }
    use crate::maps::{AddrFamily, IPPROTO_TCP};

    fn flow(src_last: u8, sport: u16) -> FlowKey {
        let mut f = FlowKey::zeroed_for(AddrFamily::V4, IPPROTO_TCP);
        f.src[..4].copy_from_slice(&[198, 18, 0, src_last]);
        f.dst[..4].copy_from_slice(&[198, 19, 0, 1]);
        f.src_port = sport.to_be_bytes();
        f.dst_port = 80u16.to_be_bytes();
        f
    }

    #[test]
    fn hash_is_fixed_across_builds() {
        // A change here moves flows between backends on a rolling upgrade: it must be deliberate.
        assert_eq!(flow_hash(&flow(1, 40000), u32::MAX), 0x6527_4bc4);
    }

    #[test]
    fn port_mask_gives_source_ip_affinity() {
        assert_eq!(flow_hash(&flow(1, 1000), 0), flow_hash(&flow(1, 2000), 0));
        assert_ne!(
            flow_hash(&flow(1, 1000), u32::MAX),
            flow_hash(&flow(1, 2000), u32::MAX)
        );
    }

    #[test]
    fn slots_cover_the_table_evenly() {
        let size = 251;
        let mut counts = [0u32; 251];
        for port in 0..50_200u16 {
            counts[maglev_slot(flow_hash(&flow(9, port), u32::MAX), size) as usize] += 1;
        }
        // 200 per slot on average; Binomial sd ~14, so 120..280 is over 5 sd.
        assert!(
            counts.iter().all(|&c| (120..=280).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(maglev_slot(u32::MAX, size), size - 1);
        assert_eq!(maglev_slot(0, size), 0);
    }

    #[test]
    fn filter_bits_spread() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000u32 {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&(0xc613_0000 + i).to_be_bytes());
            let bit = vip_filter_bit(&a);
            assert!(bit < VIP_FILTER_BITS);
            assert_eq!(bit, vip_filter_bit_v4([a[0], a[1], a[2], a[3]]));
            seen.insert(bit);
        }
        // 1,000 consecutive addresses over 65,536 bits: almost no collisions.
        assert!(seen.len() > 980, "{}", seen.len());
    }

    #[test]
    fn source_ports_spread_evenly() {
        let buckets = 16;
        let mut counts = [0u32; 16];
        for port in 0..16_000u16 {
            counts[(flow_hash(&flow(7, port), u32::MAX) % buckets) as usize] += 1;
        }
        // Binomial(16000, 1/16): sd ~ 30.6 around 1000; 6 sd is far beyond chance.
        for c in counts {
            assert!(
                (816..=1184).contains(&c),
                "bucket count {c} out of range: {counts:?}"
            );
        }
    }
}
