//! Encapsulation toward the backend: an IPv4 or IPv6 outer header (and GUE's UDP header) around
//! the client's IPv4 or IPv6 packet (IPIP, 6in4, 4in6, IP6IP6), behind the next hop's L2 header.
//!
//! The outer header is built on the stack and its checksum is computed over those exact bytes.
//! The client's packet is never touched: the backend gets it byte for byte.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use vip_common::{
    AddrFamily, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, VIP_F_GUE, VipMeta,
    checksum::{OUTER_TTL, add_words, fold, ipv4_header},
};

use vip_ebpf::packet::{ETH_P_IP, ETH_P_IPV6, UDP_LEN, VLAN_ETH_LEN, Window, header, read};

use crate::{
    client::Inner,
    nexthop::{self, NextHop},
    select::Choice,
};

/// Encapsulates the packet toward `choice.backend`, with the L2 header of its next hop, which
/// it returns; `None` when the frame has no headroom for the outer header.
#[inline(always)]
pub(crate) fn encapsulate(
    ctx: &XdpContext,
    l2_len: usize,
    meta: &VipMeta,
    choice: &Choice,
    inner: Inner,
) -> Option<NextHop> {
    let backend = choice.backend;
    let outer_v6 = backend.family == AddrFamily::V6 as u8;
    let gue = gue(ctx, l2_len, meta, choice.hash, &inner, outer_v6);
    if outer_v6 {
        let (src_head, src_tail) = split_v6(&meta.src_v6);
        let outer = Outer6 {
            src_head,
            src_tail: with_entropy(*src_tail, meta.src_v6_entropy, choice.hash),
            dst: &backend.addr,
            flow_label: choice.hash,
        };
        let hop = nexthop::v6(ctx, choice.backend, outer.src_words(), &backend.addr);
        push_ipv6(ctx, l2_len, &hop, &outer, inner, gue).map(|()| hop)
    } else {
        let src = with_entropy(meta.src_v4, meta.src_v4_entropy, choice.hash);
        let dst = [
            backend.addr[0],
            backend.addr[1],
            backend.addr[2],
            backend.addr[3],
        ];
        let hop = nexthop::v4(ctx, choice.backend, &src, &dst);
        push_ipv4(ctx, l2_len, &hop, (&src, &dst), inner, gue).map(|()| hop)
    }
}

/// `addr` with the flow hash's bits where `entropy` has ones (a source prefix's host bits).
#[inline(always)]
fn with_entropy(addr: [u8; 4], entropy: [u8; 4], hash: u32) -> [u8; 4] {
    let bits = u32::from_ne_bytes(hash.to_be_bytes()) & u32::from_ne_bytes(entropy);
    (u32::from_ne_bytes(addr) | bits).to_ne_bytes()
}

/// Prepends an IPv4 header (IPIP, or 6in4 for an IPv6 client packet), and with GUE a UDP
/// header (checksum zero, as IPv4 allows).
#[inline(always)]
fn push_ipv4(
    ctx: &XdpContext,
    l2_len: usize,
    hop: &NextHop,
    (src, dst): (&[u8; 4], &[u8; 4]),
    inner: Inner,
    gue: Gue,
) -> Option<()> {
    const LEN: usize = 20;
    let total = inner.len.wrapping_add((LEN + gue.udp_len()) as u16);
    let hdr = ipv4_header(inner.tos, total, gue.next_header(&inner), *src, *dst);
    let w = grow::<{ LEN + UDP_LEN }>(ctx, l2_len, LEN + gue.udp_len(), hop, ETH_P_IP)?;
    w.write(0, hdr);
    if gue.on {
        w.write(LEN, gue.header(inner.len, [0; 2]));
    }
    Some(())
}

/// Outer IPv6 addresses and the flow label.
struct Outer6<'a> {
    /// The source address is the VIP's, with entropy in its last 4 bytes: kept apart so the
    /// address is never assembled on the stack (and read back wider than it was written).
    src_head: &'a [u8; 12],
    src_tail: [u8; 4],
    dst: &'a [u8; 16],
    /// The flow hash: its low 20 bits let routers between LB and backend spread flows.
    flow_label: u32,
}

impl Outer6<'_> {
    /// The source address as four words, for the FIB lookup.
    #[inline(always)]
    fn src_words(&self) -> [u32; 4] {
        let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let head = self.src_head;
        [
            word(&head[0..4]),
            word(&head[4..8]),
            word(&head[8..12]),
            u32::from_ne_bytes(self.src_tail),
        ]
    }
}

/// Prepends an IPv6 header (IP6IP6, or 4in6 for an IPv4 client packet), and with GUE a UDP
/// header whose checksum is derived from the headers (see [`inner_sum`]).
#[inline(always)]
fn push_ipv6(
    ctx: &XdpContext,
    l2_len: usize,
    hop: &NextHop,
    outer: &Outer6,
    inner: Inner,
    gue: Gue,
) -> Option<()> {
    const LEN: usize = 40;
    let payload = inner.len.wrapping_add(gue.udp_len() as u16).to_be_bytes();
    // Version, traffic class, flow label; payload length, next header, hop limit.
    let head = [
        ipv6_first_word(inner.tos, outer.flow_label),
        u32::from_ne_bytes([payload[0], payload[1], gue.next_header(&inner), OUTER_TTL]),
    ];
    let w = grow::<{ LEN + UDP_LEN }>(ctx, l2_len, LEN + gue.udp_len(), hop, ETH_P_IPV6)?;
    if gue.on {
        let src_sum = add_words(add_words(gue.inner_sum, outer.src_head), &outer.src_tail);
        let mut sum = add_words(src_sum, outer.dst);
        // Pseudo-header length and next header, then the UDP header itself.
        let udp_total = u32::from(inner.len) + UDP_LEN as u32;
        sum += udp_total + u32::from(IPPROTO_UDP);
        sum = add_words(sum, &gue.header(inner.len, [0; 2]));
        let checksum = match !fold(sum) {
            0 => 0xffff,
            c => c,
        };
        w.write(LEN, gue.header(inner.len, checksum.to_be_bytes()));
    }
    // Addresses go from map values into the packet as words: copied as arrays, LLVM cannot
    // rule out that they overlap the packet and calls `memmove`.
    w.write(0, head);
    w.write(8, word::<8>(outer.src_head, 0));
    w.write(16, word::<4>(outer.src_head, 8));
    w.write(20, outer.src_tail);
    w.write(24, word::<8>(outer.dst, 0));
    w.write(32, word::<8>(outer.dst, 8));
    Some(())
}

/// The first word of an IPv6 header: version, traffic class `tos`, and the low 20 bits of
/// `label`.
#[inline(always)]
pub(crate) fn ipv6_first_word(tos: u8, label: u32) -> u32 {
    let label = label & 0x000f_ffff;
    u32::from_ne_bytes([
        0x60 | (tos >> 4),
        (tos << 4) | (label >> 16) as u8,
        (label >> 8) as u8,
        label as u8,
    ])
}

/// `W` bytes of `bytes` from `at`, by value.
#[inline(always)]
fn word<const W: usize>(bytes: &[u8], at: usize) -> [u8; W] {
    let mut w = [0; W];
    w.copy_from_slice(&bytes[at..at + W]);
    w
}

/// An IPv6 address as its first 12 and last 4 bytes.
#[inline(always)]
fn split_v6(addr: &[u8; 16]) -> (&[u8; 12], &[u8; 4]) {
    let (head, tail) = addr.split_at(12);
    // Lengths 12 and 4 by construction: the conversions cannot fail.
    (
        head.try_into().unwrap_or(&[0; 12]),
        tail.try_into().unwrap_or(&[0; 4]),
    )
}

/// GUE (variant 1) for one packet: UDP ports, and for an IPv6 outer header the one's-complement
/// sum of the client's packet; or none (`on` false: plain IP-in-IP). Not an `Option`: LLVM may
/// carry a `None`'s undefined payload in a register and spill it, which the verifier refuses.
#[derive(Clone, Copy)]
struct Gue {
    on: bool,
    src_port: [u8; 2],
    dst_port: [u8; 2],
    inner_sum: u32,
}

impl Gue {
    const OFF: Self = Self {
        on: false,
        src_port: [0; 2],
        dst_port: [0; 2],
        inner_sum: 0,
    };

    /// Bytes of UDP header this packet gets.
    #[inline(always)]
    fn udp_len(&self) -> usize {
        if self.on { UDP_LEN } else { 0 }
    }

    /// The outer IP header's protocol / next header: UDP, or the client's IP version.
    #[inline(always)]
    fn next_header(&self, inner: &Inner) -> u8 {
        if self.on {
            IPPROTO_UDP
        } else {
            inner.outer_proto()
        }
    }

    #[inline(always)]
    fn header(&self, inner_len: u16, checksum: [u8; 2]) -> [u8; UDP_LEN] {
        let len = inner_len.wrapping_add(UDP_LEN as u16).to_be_bytes();
        [
            self.src_port[0],
            self.src_port[1],
            self.dst_port[0],
            self.dst_port[1],
            len[0],
            len[1],
            checksum[0],
            checksum[1],
        ]
    }
}

/// Whether and how this packet goes GUE: the VIP asks for it and, under an IPv6 outer header,
/// the UDP checksum can be derived from headers; otherwise it goes IP-in-IP.
#[inline(always)]
fn gue(
    ctx: &XdpContext,
    l2_len: usize,
    meta: &VipMeta,
    hash: u32,
    inner: &Inner,
    outer_v6: bool,
) -> Gue {
    if meta.flags & VIP_F_GUE == 0 {
        return Gue::OFF;
    }
    // An ephemeral-range source port from the flow hash: backends' RSS spreads flows on it.
    let src_port = (0xc000 | (hash as u16 & 0x3fff)).to_be_bytes();
    let inner_sum = if outer_v6 {
        inner_sum(ctx, l2_len, inner)
    } else {
        Some(0)
    };
    let Some(inner_sum) = inner_sum else {
        return Gue::OFF;
    };
    Gue {
        on: true,
        src_port,
        dst_port: meta.gue_port,
        inner_sum,
    }
}

/// The one's-complement sum of the client's IP packet, from its headers alone: a valid TCP,
/// UDP or ICMPv6 checksum makes the transport segment sum to the complement of its
/// pseudo-header, an ICMPv4 message and an IPv4 header sum to zero. `None` where that does not
/// hold: IPv4 UDP without checksum, fragments, other protocols.
#[inline(always)]
fn inner_sum(ctx: &XdpContext, l3: usize, inner: &Inner) -> Option<u32> {
    match inner.family {
        AddrFamily::V4 => {
            let ip = header::<Ipv4Hdr>(ctx, l3)?;
            if ip.vihl != 0x45 || u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
                return None;
            }
            let segment_len = u32::from(u16::from_be_bytes(ip.tot_len)).wrapping_sub(20);
            match ip.proto {
                IPPROTO_ICMP => return Some(0),
                IPPROTO_TCP => {}
                IPPROTO_UDP if read::<[u8; 2]>(ctx, l3 + 20 + 6)? != [0, 0] => {}
                _ => return None,
            }
            let pseudo = add_words(add_words(0, &ip.src_addr), &ip.dst_addr);
            let pseudo = pseudo + u32::from(ip.proto) + segment_len;
            Some(u32::from(!fold(pseudo)))
        }
        AddrFamily::V6 => {
            let ip = header::<Ipv6Hdr>(ctx, l3)?;
            if !matches!(ip.next_hdr, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6) {
                return None;
            }
            let header_sum = add_words(0, &read::<[u8; 40]>(ctx, l3)?);
            let pseudo = add_words(add_words(0, &ip.src_addr), &ip.dst_addr);
            let pseudo =
                pseudo + u32::from(u16::from_be_bytes(ip.payload_len)) + u32::from(ip.next_hdr);
            Some(header_sum + u32::from(!fold(pseudo)))
        }
    }
}

/// Grows the frame by `len` bytes for the outer headers and writes its L2 header (keeping a
/// VLAN tag); the window is the `N` bytes where the outer headers go, behind the L2 header.
/// The grown frame holds them and an IP header behind them, so the window fits.
#[inline(always)]
fn grow<const N: usize>(
    ctx: &XdpContext,
    l2_len: usize,
    len: usize,
    hop: &NextHop,
    ether_type: [u8; 2],
) -> Option<Window<N>> {
    let tag = vlan_tag(ctx, l2_len)?;
    grow_head(ctx, len)?;
    write_l2(ctx, hop, tag, ether_type)?;
    Window::at(ctx, l2_len)
}

/// The frame's VLAN tag (TPID and TCI), read before the frame grows; zero without one.
#[inline(always)]
pub(crate) fn vlan_tag(ctx: &XdpContext, l2_len: usize) -> Option<[u8; 4]> {
    if l2_len == VLAN_ETH_LEN {
        read::<[u8; 4]>(ctx, 12)
    } else {
        Some([0; 4])
    }
}

/// Writes the L2 header of the grown frame: the next hop's MACs, the VLAN tag if the frame
/// has one (`tag` non-zero), and `ether_type` (4in6 and 6in4 change it).
#[inline(always)]
fn write_l2(ctx: &XdpContext, hop: &NextHop, tag: [u8; 4], ether_type: [u8; 2]) -> Option<()> {
    let w = Window::<VLAN_ETH_LEN>::at(ctx, 0)?;
    w.write(0, hop.dst_mac);
    w.write(6, hop.src_mac);
    if tag != [0; 4] {
        w.write(12, tag);
        w.write(16, ether_type);
    } else {
        w.write(12, ether_type);
    }
    Some(())
}

/// Makes room for `len` bytes in front of the packet. All packet pointers are invalid after it.
#[inline(always)]
pub(crate) fn grow_head(ctx: &XdpContext, len: usize) -> Option<()> {
    // SAFETY: helper call on our own context; afterwards every access re-checks bounds.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) };
    (rc == 0).then_some(())
}
