//! The next hop a packet leaves through: the one the agent resolved for the backend, or else
//! the kernel's FIB (`bpf_fib_lookup`); and how it leaves (XDP_TX, redirect through `TX_PORTS`,
//! or to the stack when the kernel must resolve a neighbour first).

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use vip_common::{BACKEND_F_NEXTHOP, Backend, Outcome};

use crate::maps::TX_PORTS;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LOOKUP_OUTPUT: u32 = 1 << 1;

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
pub(crate) struct NextHop {
    pub(crate) dst_mac: [u8; 6],
    pub(crate) src_mac: [u8; 6],
    ifindex: u32,
    status: HopStatus,
}

/// Sends the encapsulated frame on its way: back out of the arrival interface, redirected to
/// the next hop's, or to the stack when the kernel has no neighbour (or no route) for it yet.
#[inline(always)]
pub(crate) fn leave(ctx: &XdpContext, hop: &NextHop) -> Outcome {
    match hop.status {
        HopStatus::NoNeighbour => Outcome::NoNeighbourPassed,
        HopStatus::NoRoute => Outcome::NoRoutePassed,
        HopStatus::Resolved => send(ctx, hop.ifindex),
    }
}

/// Sends the frame out of `ifindex`: back out of the arrival interface (XDP_TX), or
/// redirected.
#[inline(always)]
pub(crate) fn send(ctx: &XdpContext, ifindex: u32) -> Outcome {
    if ifindex as usize == ctx.ingress_ifindex() {
        return Outcome::Tx;
    }
    // Through the devmap where the agent has put the interface; by ifindex (the kernel looks
    // the device up per packet) until it has.
    if TX_PORTS.redirect(ifindex, 0).is_err() {
        // SAFETY: plain helper call; with no flags it returns XDP_REDIRECT (a bad ifindex
        // fails later, in the kernel's redirect).
        unsafe { bpf_redirect(ifindex, 0) };
    }
    Outcome::Redirected
}

impl NextHop {
    /// The interface the frame leaves by, when the next hop is resolved.
    #[inline(always)]
    pub(crate) fn resolved_ifindex(&self) -> Option<u32> {
        (self.status == HopStatus::Resolved).then_some(self.ifindex)
    }
}

/// The backend's next hop as the agent resolved it, or as the kernel's FIB says.
#[inline(always)]
fn resolved(b: &Backend) -> Option<NextHop> {
    (b.flags & BACKEND_F_NEXTHOP != 0).then_some(NextHop {
        dst_mac: b.dst_mac,
        src_mac: b.src_mac,
        ifindex: b.ifindex,
        status: HopStatus::Resolved,
    })
}

/// The next hop toward an IPv4 backend, from `src`.
#[inline(always)]
pub(crate) fn v4(ctx: &XdpContext, backend: &Backend, src: &[u8; 4], dst: &[u8; 4]) -> NextHop {
    if let Some(hop) = resolved(backend) {
        return hop;
    }
    let mut params = fib_params(ctx, AF_INET);
    params.0.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(*src);
    params.0.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*dst);
    fib(ctx, params)
}

/// The next hop toward an IPv6 backend at `dst`, from the source address `src` (as words).
#[inline(always)]
pub(crate) fn v6(ctx: &XdpContext, backend: &Backend, src: [u32; 4], dst: &[u8; 16]) -> NextHop {
    if let Some(hop) = resolved(backend) {
        return hop;
    }
    let mut params = fib_params(ctx, AF_INET6);
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    params.0.__bindgen_anon_3.ipv6_src = src;
    params.0.__bindgen_anon_4.ipv6_dst = [
        word(&dst[0..4]),
        word(&dst[4..8]),
        word(&dst[8..12]),
        word(&dst[12..16]),
    ];
    fib(ctx, params)
}

/// `bpf_fib_lookup` on an 8-byte boundary of the stack: LLVM fills its address fields with
/// 8-byte stores (the build allows misaligned access), and the verifier refuses a misaligned
/// store to the stack; the C struct alone is only 4-byte aligned.
#[repr(C, align(8))]
struct FibParams(bpf_fib_lookup);

#[inline(always)]
fn fib_params(ctx: &XdpContext, family: u8) -> FibParams {
    // SAFETY: `bpf_fib_lookup` is a plain C struct for which all-zero is the documented default.
    let mut params: bpf_fib_lookup = unsafe { MaybeUninit::zeroed().assume_init() };
    params.family = family;
    params.ifindex = ctx.ingress_ifindex() as u32;
    FibParams(params)
}

#[inline(always)]
fn fib(ctx: &XdpContext, mut params: FibParams) -> NextHop {
    // An output lookup: the LB originates the outer packet (its own source address), so the
    // node needs no IP forwarding for it.
    // SAFETY: `params` is a valid, initialised struct on our stack of the size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &mut params.0,
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
        dst_mac: stack_mac(&params.0.dmac),
        src_mac: stack_mac(&params.0.smac),
        ifindex: params.0.ifindex,
        status,
    }
}

/// A MAC address out of `bpf_fib_lookup` parameters on the stack. The program is built with
/// misaligned loads allowed (for packet headers), but the verifier refuses misaligned stack
/// reads, and `dmac` sits at 2 mod 4: three 16-bit volatile reads, which LLVM cannot widen.
#[inline(always)]
fn stack_mac(mac: &[u8; 6]) -> [u8; 6] {
    let words = mac.as_ptr().cast::<u16>();
    // SAFETY: both MAC fields of `bpf_fib_lookup` start at even offsets of a 4-aligned struct.
    let [a, b, c] = unsafe {
        [
            words.read_volatile(),
            words.add(1).read_volatile(),
            words.add(2).read_volatile(),
        ]
    }
    .map(u16::to_ne_bytes);
    [a[0], a[1], b[0], b[1], c[0], c[1]]
}
