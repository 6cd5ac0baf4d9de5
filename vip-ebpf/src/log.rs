//! Datapath debug logs through aya-log: one record per packet addressed to a VIP, saying what
//! became of it, and for a forwarded packet the client's flow and the backend it went to.
//!
//! Off unless the agent is asked for them (`vip-agent run --datapath-log`): the agent sets
//! `AYA_LOG_LEVEL` before loading, and below Debug the verifier removes the hand-over as dead
//! code, so a node without logs pays nothing. With logs on, `vip_lb` hands the finished packet
//! to `vip_lb_log` with a tail call (its own stack: `vip_lb` uses nearly all of its 512 bytes),
//! which reads the record back from the packet as it leaves and returns `vip_lb`'s action.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{PerCpuArray, ProgramArray},
    macros::btf_map,
    programs::XdpContext,
};
use aya_log_ebpf::{
    debug,
    macro_support::{Level, level_enabled},
};
use vip_common::{IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, Outcome};

use vip_ebpf::packet::{ETH_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, UDP_LEN, VLAN_ETH_LEN, read};

/// `vip_lb_log` at index 0, put there by the agent when logs are on.
#[btf_map]
static LOG_PROGRAM: ProgramArray<1> = ProgramArray::new();

/// What `vip_lb` hands `vip_lb_log`, per CPU: (outcome code, action).
#[btf_map]
static LOG_HANDOVER: PerCpuArray<[u32; 2], 1> = PerCpuArray::new();

/// With logs on, hands the packet and `action` to `vip_lb_log`, which then ends this run.
/// Returns when logs are off, the packet was for no VIP, or `vip_lb_log` is not loaded.
#[inline(always)]
pub(crate) fn hand_over(ctx: &XdpContext, outcome: Outcome, action: u32) {
    let code = outcome.code();
    if outcome == Outcome::Passed || !level_enabled(Level::Debug) {
        return;
    }
    if let Some(slot) = LOG_HANDOVER.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; `vip_lb_log` reads it in this same run.
        unsafe {
            *slot = [code, action];
            LOG_PROGRAM.tail_call(ctx, 0);
        }
    }
}

/// One IP header's view of a packet.
struct Endpoints {
    src: IpAddr,
    dst: IpAddr,
    /// Protocol (IPv4) or next header (IPv6).
    proto: u8,
    /// Where the IP payload starts.
    payload: usize,
}

#[inline(always)]
fn endpoints(ctx: &XdpContext, l3: usize) -> Option<Endpoints> {
    // Whole headers, not single bytes: the verifier follows `data + off + size > data_end` for
    // a variable `off` only when `size` survives compilation, which a 1-byte read may not.
    if read::<[u8; 2]>(ctx, l3)?[0] >> 4 == 4 {
        let h = read::<[u8; 20]>(ctx, l3)?;
        let at = |i: usize| [h[i], h[i + 1], h[i + 2], h[i + 3]];
        return Some(Endpoints {
            src: IpAddr::V4(Ipv4Addr::from(at(12))),
            dst: IpAddr::V4(Ipv4Addr::from(at(16))),
            proto: h[9],
            payload: l3 + usize::from(h[0] & 0x0f) * 4,
        });
    }
    let h = read::<[u8; 40]>(ctx, l3)?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    Some(Endpoints {
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        proto: h[6],
        payload: l3 + 40,
    })
}

/// The IP header after the Ethernet header (and one VLAN tag).
#[inline(always)]
fn l3(ctx: &XdpContext) -> Option<usize> {
    let (ether_type, l3) = match read::<[u8; 2]>(ctx, 12)? {
        ETH_P_8021Q => (read::<[u8; 2]>(ctx, 16)?, VLAN_ETH_LEN),
        other => (other, ETH_LEN),
    };
    (ether_type == ETH_P_IP || ether_type == ETH_P_IPV6).then_some(l3)
}

/// `vip_lb_log`: logs the packet `vip_lb` handed over and returns `vip_lb`'s action.
#[inline(always)]
pub(crate) fn record(ctx: &XdpContext) -> u32 {
    let Some(&[code, action]) = LOG_HANDOVER.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let outcome = Outcome::from_code(code);
    let (what, encapsulated) = (outcome.log_text(), outcome.encapsulated());
    let _ = (|| {
        let packet = endpoints(ctx, l3(ctx)?)?;
        let (client, backend) = if encapsulated {
            let inner = match packet.proto {
                IPPROTO_IPIP | IPPROTO_IPV6 => packet.payload,
                IPPROTO_UDP => packet.payload + UDP_LEN,
                _ => return None,
            };
            (endpoints(ctx, inner)?, Some(packet.dst))
        } else {
            (packet, None)
        };
        let ports = read::<[u8; 4]>(ctx, client.payload).unwrap_or_default();
        let src_port = u16::from_be_bytes([ports[0], ports[1]]);
        let dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        match backend {
            Some(backend) => debug!(
                ctx,
                "{} {}:{} -> {}:{} proto {} to backend {}",
                what,
                client.src,
                src_port,
                client.dst,
                dst_port,
                client.proto,
                backend
            ),
            None => debug!(
                ctx,
                "{} {}:{} -> {}:{} proto {}",
                what,
                client.src,
                src_port,
                client.dst,
                dst_port,
                client.proto
            ),
        }
        Some(())
    })();
    action
}
