//! Health checks through the data path. The agent's probe connects to the VIP with its packets
//! marked `HEALTH_CHECK_MARK | BackendId`; the VIP is local (on `lo`), so they leave through
//! `lo`, whose tc egress hook runs [`encapsulate`]: it wraps them as the datapath wraps client
//! packets for that backend and sends them out of the backend's next hop. The backend answers
//! the agent directly, as it answers clients, so a check passes only when the backend really
//! serves the VIP: decapsulation, the VIP on its `lo`, the service listening.
//!
//! Same-family encapsulation only (IPIP, IP6IP6, GUE over IPv4): the agent refuses the others
//! for data-path checks. Unmarked packets pass untouched.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_redirect,
    programs::TcContext,
};
use vip_common::{
    AddrFamily, BACKEND_F_NEXTHOP, HEALTH_CHECK_MARK, HEALTH_CHECK_MARK_MASK, IPPROTO_IPIP,
    IPPROTO_IPV6, IPPROTO_UDP, VIP_F_GUE,
    checksum::{OUTER_TTL, ipv4_header},
};

use vip_ebpf::packet::{ETH_LEN, ETH_P_IPV6, IPV4_LEN, UDP_LEN};

use crate::maps::{BACKENDS, VIP_META};
/// GUE source port of probes (any port works: the backend decapsulates by destination port).
const PROBE_GUE_SOURCE_PORT: u16 = 0xc0de;

/// tc verdict for a packet leaving through `lo`.
#[inline(always)]
pub(crate) fn encapsulate(ctx: &TcContext) -> i32 {
    // SAFETY: reading a field of the program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & HEALTH_CHECK_MARK_MASK != HEALTH_CHECK_MARK {
        return TC_ACT_OK;
    }
    // A probe that cannot go where it is meant to is dropped: delivered locally, it would
    // reach this node's own service and pass the check.
    toward_backend(ctx, mark & !HEALTH_CHECK_MARK_MASK).unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn toward_backend(ctx: &TcContext, id: u32) -> Option<i32> {
    let backend = BACKENDS.get(id)?;
    if backend.flags & BACKEND_F_NEXTHOP == 0 {
        return None;
    }
    let meta = VIP_META.get(backend.vip_id)?;
    let inner_len = (ctx.len() as usize).checked_sub(ETH_LEN)? as u16;
    let outer_v6 = backend.family == AddrFamily::V6 as u8;
    let inner_v6 = u16::from_be(ctx.skb.protocol() as u16) == u16::from_be_bytes(ETH_P_IPV6);
    let gue = meta.flags & VIP_F_GUE != 0;
    if inner_v6 != outer_v6 || (gue && outer_v6) {
        return None;
    }
    let udp_len = if gue { UDP_LEN } else { 0 };
    if outer_v6 {
        let payload = inner_len.to_be_bytes();
        let mut hdr = [0u8; 40];
        hdr[0] = 0x60;
        hdr[4] = payload[0];
        hdr[5] = payload[1];
        hdr[6] = IPPROTO_IPV6;
        hdr[7] = OUTER_TTL;
        hdr[8..24].copy_from_slice(&meta.src_v6);
        hdr[24..40].copy_from_slice(&backend.addr);
        ctx.adjust_room(
            40,
            BPF_ADJ_ROOM_MAC,
            u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV6),
        )
        .ok()?;
        ctx.store(ETH_LEN, &hdr, 0).ok()?;
    } else {
        let proto = if gue { IPPROTO_UDP } else { IPPROTO_IPIP };
        let dst = [
            backend.addr[0],
            backend.addr[1],
            backend.addr[2],
            backend.addr[3],
        ];
        let hdr = ipv4_header(0, inner_len + 20 + udp_len as u16, proto, meta.src_v4, dst);
        let mut flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
        if gue {
            flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP;
        }
        ctx.adjust_room((20 + udp_len) as i32, BPF_ADJ_ROOM_MAC, u64::from(flags))
            .ok()?;
        ctx.store(ETH_LEN, &hdr, 0).ok()?;
        if gue {
            let source = PROBE_GUE_SOURCE_PORT.to_be_bytes();
            let len = (inner_len + UDP_LEN as u16).to_be_bytes();
            let udp = [
                source[0],
                source[1],
                meta.gue_port[0],
                meta.gue_port[1],
                len[0],
                len[1],
                0,
                0,
            ];
            ctx.store(ETH_LEN + IPV4_LEN, &udp, 0).ok()?;
        }
    }
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&backend.dst_mac);
    eth[6..].copy_from_slice(&backend.src_mac);
    ctx.store(0, &eth, 0).ok()?;
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT on a bad ifindex.
    Some(unsafe { bpf_redirect(backend.ifindex, 0) } as i32)
}
