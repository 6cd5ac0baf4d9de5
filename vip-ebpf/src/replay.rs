//! Replaying a flow's outer headers: an established flow's packets leave with the L2 and outer
//! headers its previous packet left with, but for the fields that change per packet (lengths,
//! TOS, the IPv4 checksum). A hit skips the VIP and backend reads and checks, the next-hop
//! choice and the header build: the one-time work of a flow stays in `encap` and `nexthop`, and
//! this module only records what they wrote and writes it again.
//!
//! A recording lives in the flow's slot of this CPU's flow cache (see `conntrack`), so it is
//! dropped whenever the slot's entry is renewed from the table or replaced. It holds while
//! `CONFIG_GENERATION` has not moved: the agent bumps it after every change of a VIP, a backend
//! (its next hop among them) or the datapath config, and a recording carries the generation
//! read before the VIP and backend it was built from. Plain IP-in-IP only: GUE under IPv6 sums
//! each client packet into its checksum, and stays with `encap`.

use aya_ebpf::programs::XdpContext;
use vip_common::{
    AddrFamily, Outcome, VIP_F_GUE, VipMeta,
    checksum::{ipv4_checksum, ipv4_first_word, ipv4_rest_sum},
};
use vip_ebpf::packet::{ETH_LEN, IPV4_LEN, IPV6_LEN, VLAN_ETH_LEN, Window, read};

use crate::{
    client::Inner,
    encap::{grow_head, ipv6_first_word, vlan_tag},
    maps::CONFIG_GENERATION,
    nexthop::{self, NextHop},
    select::Choice,
};

/// Whole words of the longest head recorded: a VLAN-tagged L2 header and an IPv6 outer header.
const HEAD_WORDS: usize = (VLAN_ETH_LEN + IPV6_LEN) / 8;

/// A flow's recorded headers (in its flow-cache slot). `outer_len` comes first: it is the
/// field a new slot entry clears, next to the key and entry that the same write renews.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Replay {
    /// Outer header length, `IPV4_LEN` or `IPV6_LEN`; 0: nothing recorded.
    outer_len: u8,
    /// L2 header length: `ETH_LEN` or `VLAN_ETH_LEN`.
    l2_len: u8,
    _pad: [u8; 6],
    /// The interface the frame leaves by.
    ifindex: u32,
    /// For an IPv6 outer header: its flow label.
    flow_label: u32,
    /// `CONFIG_GENERATION` read before the VIP and backend the headers were built from.
    generation: u64,
    /// For an IPv4 outer header: `ipv4_rest_sum` of its words that stay the same.
    ipv4_rest: u64,
    /// The frame's first `l2_len + outer_len` bytes as the recorded packet left: its whole
    /// words, then its last 8 bytes, which overlap the last whole word. The head is written
    /// back in word stores only: its 2 or 6 bytes past the last whole word, written as
    /// they are, become byte stores (the packet's alignment is unknown).
    head: [u64; HEAD_WORDS],
    head_end: u64,
}

/// `CONFIG_GENERATION` now.
#[inline(always)]
pub(crate) fn generation() -> u64 {
    CONFIG_GENERATION.get(0).copied().unwrap_or(0)
}

impl Replay {
    /// Drops the recording (the slot's entry changed).
    #[inline(always)]
    pub(crate) fn clear(&mut self) {
        self.outer_len = 0;
    }

    /// Whether the recording holds at `generation` for a frame with an L2 header of `l2_len`.
    #[inline(always)]
    pub(crate) fn holds(&self, generation: u64, l2_len: usize) -> bool {
        self.outer_len != 0 && self.generation == generation && self.l2_len as usize == l2_len
    }

    /// Records the headers `encap` just wrote in front of a packet with an L2 header of
    /// `l2_len`, toward `choice` of `meta` by `hop`, which were read under `generation`.
    /// Nothing is recorded for a next hop the kernel must resolve, nor for GUE.
    #[inline(always)]
    pub(crate) fn record(
        &mut self,
        ctx: &XdpContext,
        generation: u64,
        l2_len: usize,
        (meta, choice, hop): (&VipMeta, &Choice, &NextHop),
    ) {
        self.clear();
        let Some(ifindex) = hop.resolved_ifindex() else {
            return;
        };
        if meta.flags & VIP_F_GUE != 0 {
            return;
        }
        let outer_v6 = choice.backend.family == AddrFamily::V6 as u8;
        let recorded = match (l2_len, outer_v6) {
            (ETH_LEN, false) => self.read_head::<{ ETH_LEN + IPV4_LEN }>(ctx),
            (VLAN_ETH_LEN, false) => self.read_head::<{ VLAN_ETH_LEN + IPV4_LEN }>(ctx),
            (ETH_LEN, true) => self.read_head::<{ ETH_LEN + IPV6_LEN }>(ctx),
            (VLAN_ETH_LEN, true) => self.read_head::<{ VLAN_ETH_LEN + IPV6_LEN }>(ctx),
            _ => None,
        };
        if recorded.is_none() {
            return;
        }
        if outer_v6 {
            let Some([_, class_label, label_mid, label_low]) = read::<[u8; 4]>(ctx, l2_len) else {
                return;
            };
            self.flow_label = u32::from_be_bytes([0, class_label & 0x0f, label_mid, label_low]);
        } else {
            // Words 2-4 of the IPv4 header: TTL and protocol (not the checksum), addresses.
            let word = |at: usize| read::<[u8; 4]>(ctx, l2_len + at);
            let (Some([ttl, proto, ..]), Some(src), Some(dst)) = (word(8), word(12), word(16))
            else {
                return;
            };
            let ttl_proto = u32::from_ne_bytes([ttl, proto, 0, 0]);
            let (src, dst) = (u32::from_ne_bytes(src), u32::from_ne_bytes(dst));
            self.ipv4_rest = ipv4_rest_sum(ttl_proto, src, dst);
        }
        self.generation = generation;
        self.ifindex = ifindex;
        self.l2_len = l2_len as u8;
        self.outer_len = if outer_v6 { IPV6_LEN } else { IPV4_LEN } as u8;
    }

    /// Copies the frame's first `N` bytes into `head` and `head_end`.
    #[inline(always)]
    fn read_head<const N: usize>(&mut self, ctx: &XdpContext) -> Option<()> {
        let mut at = 0;
        while at + 8 <= N {
            self.head[at / 8] = read::<u64>(ctx, at)?;
            at += 8;
        }
        self.head_end = read::<u64>(ctx, N - 8)?;
        Some(())
    }

    /// Sends the packet with the recorded headers: the frame grows by the outer header, the
    /// recorded bytes go in front, and the per-packet fields are set from `inner`.
    #[inline(always)]
    pub(crate) fn send(&self, ctx: &XdpContext, inner: Inner) -> Outcome {
        let sent = match (self.l2_len as usize, self.outer_len as usize) {
            (ETH_LEN, IPV4_LEN) => self.write_head::<{ ETH_LEN + IPV4_LEN }, ETH_LEN>(ctx, inner),
            (VLAN_ETH_LEN, IPV4_LEN) => {
                self.write_head::<{ VLAN_ETH_LEN + IPV4_LEN }, VLAN_ETH_LEN>(ctx, inner)
            }
            (ETH_LEN, IPV6_LEN) => self.write_head::<{ ETH_LEN + IPV6_LEN }, ETH_LEN>(ctx, inner),
            (VLAN_ETH_LEN, IPV6_LEN) => {
                self.write_head::<{ VLAN_ETH_LEN + IPV6_LEN }, VLAN_ETH_LEN>(ctx, inner)
            }
            _ => None,
        };
        match sent {
            Some(()) => nexthop::send(ctx, self.ifindex),
            None => Outcome::DropNoHeadroom,
        }
    }

    /// `N` bytes of head, `L2` of them the L2 header, the rest the outer IP header.
    #[inline(always)]
    fn write_head<const N: usize, const L2: usize>(
        &self,
        ctx: &XdpContext,
        inner: Inner,
    ) -> Option<()> {
        // This packet's own VLAN tag, read before the frame grows.
        let tag = vlan_tag(ctx, L2)?;
        grow_head(ctx, N - L2)?;
        let w = Window::<N>::at(ctx, 0)?;
        let mut at = 0;
        while at + 8 <= N {
            w.write(at, self.head[at / 8]);
            at += 8;
        }
        w.write(N - 8, self.head_end);
        if L2 == VLAN_ETH_LEN {
            w.write(12, tag);
        }
        if N - L2 == IPV4_LEN {
            let first = ipv4_first_word(inner.tos, inner.len.wrapping_add(IPV4_LEN as u16));
            w.write(L2, first);
            w.write(L2 + 10, ipv4_checksum(first, self.ipv4_rest));
        } else {
            w.write(L2, ipv6_first_word(inner.tos, self.flow_label));
            w.write(L2 + 4, inner.len.to_be_bytes());
        }
        Some(())
    }
}
