//! Encapsulation toward the backend (IPv4 or IPv6 outer header around the client's IPv4 or IPv6
//! packet: IPIP, 6in4, 4in6, IP6IP6) and the next hop it leaves through.
//!
//! The outer header is built on the stack and its checksum is computed over those exact bytes.
//! The client's packet is never touched: the backend gets it byte for byte.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use vip_common::{
    AddrFamily, BACKEND_F_NEXTHOP, IPPROTO_IPIP, IPPROTO_IPV6, VipMeta,
    checksum::ipv4_header_checksum,
};

use vip_ebpf::packet::{ETH_P_IP, ETH_P_IPV6, read, write};

use crate::{parse::Verdict, select::Choice};

const OUTER_TTL: u8 = 64;
/// Ethernet header with one 802.1Q tag.
const MAX_L2_LEN: usize = 18;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LOOKUP_OUTPUT: u32 = 1 << 1;

/// The client's packet as the outer header must describe it.
#[derive(Clone, Copy)]
pub struct Inner {
    /// Length of the client's IP packet (its own length field, already validated).
    pub len: u16,
    /// IPv4 TOS or IPv6 traffic class, copied to the outer header.
    pub tos: u8,
    pub family: AddrFamily,
}

impl Inner {
    #[inline(always)]
    fn outer_proto(&self) -> u8 {
        match self.family {
            AddrFamily::V4 => IPPROTO_IPIP,
            AddrFamily::V6 => IPPROTO_IPV6,
        }
    }
}

/// Whether the next hop is known.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HopStatus {
    Resolved,
    /// The kernel has a route but no neighbour entry yet: it resolves one when given a packet.
    NoNeighbour,
    /// The kernel has no route to the backend (or the interface does not forward).
    NoRoute,
}

/// Where the frame goes: MACs and the action.
struct NextHop {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    ifindex: u32,
    status: HopStatus,
}

/// Encapsulates the packet toward `choice.backend` and sends it.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    l2_len: usize,
    meta: &VipMeta,
    choice: &Choice,
    inner: Inner,
) -> Verdict {
    let backend = choice.backend;
    let entropy = choice.hash.to_be_bytes();
    let verdict = if backend.family == AddrFamily::V6 as u8 {
        let mut src = meta.src_v6;
        for i in 0..4 {
            src[12 + i] |= entropy[i] & meta.src_v6_entropy[i];
        }
        let hop = next_hop_v6(ctx, choice, &src);
        push_ipv6(ctx, l2_len, &hop, &src, &backend.addr, choice.hash, inner).map(|()| hop)
    } else {
        let mut src = meta.src_v4;
        for i in 0..4 {
            src[i] |= entropy[i] & meta.src_v4_entropy[i];
        }
        let dst = [
            backend.addr[0],
            backend.addr[1],
            backend.addr[2],
            backend.addr[3],
        ];
        let hop = next_hop_v4(ctx, choice, &src, &dst);
        push_ipv4(ctx, l2_len, &hop, &src, &dst, inner).map(|()| hop)
    };
    match verdict {
        None => Verdict::DropNoHeadroom,
        Some(hop) if hop.status == HopStatus::NoNeighbour => Verdict::NoNeighbourPass,
        Some(hop) if hop.status == HopStatus::NoRoute => Verdict::NoRoutePass,
        Some(hop) if hop.ifindex as usize == ctx.ingress_ifindex() => Verdict::Tx,
        Some(hop) => {
            // SAFETY: plain helper call; returns XDP_REDIRECT, or XDP_ABORTED on a bad ifindex.
            let action = unsafe { bpf_redirect(hop.ifindex, 0) };
            Verdict::Redirect(action as u32)
        }
    }
}

/// Prepends an IPv4 header (IPIP, or 6in4 for an IPv6 client packet).
#[inline(always)]
fn push_ipv4(
    ctx: &XdpContext,
    l2_len: usize,
    hop: &NextHop,
    src: &[u8; 4],
    dst: &[u8; 4],
    inner: Inner,
) -> Option<()> {
    const LEN: usize = 20;
    let l2 = l2_header(ctx, l2_len, hop, ETH_P_IP)?;
    let total = inner.len.wrapping_add(LEN as u16).to_be_bytes();
    let mut hdr = [0u8; LEN];
    hdr[0] = 0x45;
    hdr[1] = inner.tos;
    hdr[2] = total[0];
    hdr[3] = total[1];
    hdr[8] = OUTER_TTL;
    hdr[9] = inner.outer_proto();
    hdr[12..16].copy_from_slice(src);
    hdr[16..20].copy_from_slice(dst);
    let checksum = ipv4_header_checksum(&hdr).to_be_bytes();
    hdr[10] = checksum[0];
    hdr[11] = checksum[1];
    grow_head(ctx, LEN)?;
    // The L2 copy is 18 bytes even without a VLAN tag; its last 4 bytes are then overwritten by
    // the outer header, written second.
    write(ctx, 0, l2)?;
    write(ctx, l2_len, hdr)
}

/// Prepends an IPv6 header (IP6IP6, or 4in6 for an IPv4 client packet). The flow label carries
/// the flow hash so routers between LB and backend can spread flows.
#[inline(always)]
fn push_ipv6(
    ctx: &XdpContext,
    l2_len: usize,
    hop: &NextHop,
    src: &[u8; 16],
    dst: &[u8; 16],
    hash: u32,
    inner: Inner,
) -> Option<()> {
    const LEN: usize = 40;
    let l2 = l2_header(ctx, l2_len, hop, ETH_P_IPV6)?;
    let label = hash & 0x000f_ffff;
    let payload = inner.len.to_be_bytes();
    let mut hdr = [0u8; LEN];
    hdr[0] = 0x60 | (inner.tos >> 4);
    hdr[1] = (inner.tos << 4) | (label >> 16) as u8;
    hdr[2] = (label >> 8) as u8;
    hdr[3] = label as u8;
    hdr[4] = payload[0];
    hdr[5] = payload[1];
    hdr[6] = inner.outer_proto();
    hdr[7] = OUTER_TTL;
    hdr[8..24].copy_from_slice(src);
    hdr[24..40].copy_from_slice(dst);
    grow_head(ctx, LEN)?;
    // The L2 copy is 18 bytes even without a VLAN tag; its last 4 bytes are then overwritten by
    // the outer header, written second.
    write(ctx, 0, l2)?;
    write(ctx, l2_len, hdr)
}

/// The frame's L2 header (with a VLAN tag if it has one) re-addressed to the next hop, with the
/// ether type of the outer header (4in6 and 6in4 change it).
#[inline(always)]
fn l2_header(
    ctx: &XdpContext,
    l2_len: usize,
    hop: &NextHop,
    ether_type: [u8; 2],
) -> Option<[u8; MAX_L2_LEN]> {
    let mut l2 = read::<[u8; MAX_L2_LEN]>(ctx, 0)?;
    l2[..6].copy_from_slice(&hop.dst_mac);
    l2[6..12].copy_from_slice(&hop.src_mac);
    if l2_len == MAX_L2_LEN {
        l2[16..18].copy_from_slice(&ether_type);
    } else {
        l2[12..14].copy_from_slice(&ether_type);
    }
    Some(l2)
}

/// Makes room for `len` bytes in front of the packet. All packet pointers are invalid after it.
#[inline(always)]
fn grow_head(ctx: &XdpContext, len: usize) -> Option<()> {
    // SAFETY: helper call on our own context; afterwards every access re-checks bounds.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) };
    (rc == 0).then_some(())
}

/// The backend's next hop as the agent resolved it, or as the kernel's FIB says.
#[inline(always)]
fn resolved(choice: &Choice) -> Option<NextHop> {
    let b = choice.backend;
    (b.flags & BACKEND_F_NEXTHOP != 0).then_some(NextHop {
        dst_mac: b.dst_mac,
        src_mac: b.src_mac,
        ifindex: b.ifindex,
        status: HopStatus::Resolved,
    })
}

#[inline(always)]
fn next_hop_v4(ctx: &XdpContext, choice: &Choice, src: &[u8; 4], dst: &[u8; 4]) -> NextHop {
    if let Some(hop) = resolved(choice) {
        return hop;
    }
    let mut params = fib_params(ctx, AF_INET);
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(*src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*dst);
    fib(ctx, params)
}

#[inline(always)]
fn next_hop_v6(ctx: &XdpContext, choice: &Choice, src: &[u8; 16]) -> NextHop {
    if let Some(hop) = resolved(choice) {
        return hop;
    }
    let mut params = fib_params(ctx, AF_INET6);
    // SAFETY: `ipv6_src`/`ipv6_dst` are `[u32; 4]` views of 16 bytes; any bit pattern is valid.
    unsafe {
        params.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(*src);
        params.__bindgen_anon_4.ipv6_dst =
            core::mem::transmute::<[u8; 16], [u32; 4]>(choice.backend.addr);
    }
    fib(ctx, params)
}

#[inline(always)]
fn fib_params(ctx: &XdpContext, family: u8) -> bpf_fib_lookup {
    // SAFETY: `bpf_fib_lookup` is a plain C struct for which all-zero is the documented default.
    let mut params: bpf_fib_lookup = unsafe { MaybeUninit::zeroed().assume_init() };
    params.family = family;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params
}

#[inline(always)]
fn fib(ctx: &XdpContext, mut params: bpf_fib_lookup) -> NextHop {
    // An output lookup: the LB originates the outer packet (its own source address), so the
    // node needs no IP forwarding for it.
    // SAFETY: `params` is a valid, initialised struct on our stack of the size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    let status = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => HopStatus::Resolved,
        BPF_FIB_LKUP_RET_NO_NEIGH => HopStatus::NoNeighbour,
        _ => HopStatus::NoRoute,
    };
    NextHop {
        dst_mac: params.dmac,
        src_mac: params.smac,
        ifindex: params.ifindex,
        status,
    }
}
