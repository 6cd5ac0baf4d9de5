//! vip's decapsulation program for backends (XDP).
//!
//! Strips the outer header of IPIP, 6in4, 4in6, IP6IP6 and GUE (variant 1, on the configured
//! UDP port) packets addressed to this backend
//! (`DECAP_LOCAL`) whose inner destination is one of its VIPs (`DECAP_VIPS`), and passes the
//! client's packet to the stack, where the VIP sits on `lo`. Everything else passes untouched.
//! The kernel needs no ipip or ip6_tunnel module.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, PerCpuArray},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use vip_common::{
    AddrFamily, AddrKey, DecapConfig, DecapStats, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP,
    layout::MAX_DECAP_ADDRS,
};
use vip_ebpf::packet::{
    ETH_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, UDP_LEN, VLAN_ETH_LEN, header, read, write,
};

/// This backend's own addresses: outer destinations it accepts. Written by the agent.
#[btf_map]
static DECAP_LOCAL: HashMap<AddrKey, u32, { MAX_DECAP_ADDRS as usize }> = HashMap::new();

/// The VIPs this backend serves: inner destinations it accepts. Written by the agent.
#[btf_map]
static DECAP_VIPS: HashMap<AddrKey, u32, { MAX_DECAP_ADDRS as usize }> = HashMap::new();

/// GUE port. Written by the agent.
#[btf_map]
static DECAP_CONFIG: Array<DecapConfig, 1> = Array::new();

/// What happened to packets, per CPU.
#[btf_map]
static DECAP_STATS: PerCpuArray<DecapStats, 1> = PerCpuArray::new();

enum Verdict {
    Passed,
    Decapsulated,
    NotLocal,
    NotVip,
    Malformed,
}

#[xdp]
pub(crate) fn vip_decap(ctx: XdpContext) -> u32 {
    let verdict = decap(&ctx);
    if let Some(stats) = DECAP_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's copy of a per-CPU entry; nothing else writes it concurrently.
        let stats = unsafe { &mut *stats };
        match verdict {
            Verdict::Passed => stats.passed += 1,
            Verdict::Decapsulated => stats.decapsulated += 1,
            Verdict::NotLocal => stats.refused_not_local += 1,
            Verdict::NotVip => stats.refused_not_vip += 1,
            Verdict::Malformed => stats.refused_malformed += 1,
        }
    }
    // Decapsulated or not, the packet goes to the stack.
    xdp_action::XDP_PASS
}

fn v4_key(addr: [u8; 4]) -> AddrKey {
    let mut key = AddrKey {
        addr: [0; 16],
        family: AddrFamily::V4 as u8,
        _pad: [0; 3],
    };
    key.addr[..4].copy_from_slice(&addr);
    key
}

fn v6_key(addr: [u8; 16]) -> AddrKey {
    AddrKey {
        addr,
        family: AddrFamily::V6 as u8,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Verdict {
    let Some(ether_type) = read::<[u8; 2]>(ctx, 12) else {
        return Verdict::Passed;
    };
    let (l3, ether_type) = if ether_type == ETH_P_8021Q {
        match read::<[u8; 2]>(ctx, 16) {
            Some(t) => (VLAN_ETH_LEN, t),
            None => return Verdict::Passed,
        }
    } else {
        (ETH_LEN, ether_type)
    };
    // The outer header: its length, what it carries, and whether it is addressed to us.
    let tunnel = |proto: u8| matches!(proto, IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_UDP);
    let (mut outer_len, outer_proto, local) = match ether_type {
        ETH_P_IP => {
            let Some(ip) = header::<Ipv4Hdr>(ctx, l3) else {
                return Verdict::Passed;
            };
            if ip.vihl != 0x45 || !tunnel(ip.proto) {
                return Verdict::Passed;
            }
            (Ipv4Hdr::LEN, ip.proto, v4_key(ip.dst_addr))
        }
        ETH_P_IPV6 => {
            let Some(ip) = header::<Ipv6Hdr>(ctx, l3) else {
                return Verdict::Passed;
            };
            if !tunnel(ip.next_hdr) {
                return Verdict::Passed;
            }
            (Ipv6Hdr::LEN, ip.next_hdr, v6_key(ip.dst_addr))
        }
        _ => return Verdict::Passed,
    };
    if outer_proto == IPPROTO_UDP {
        // GUE variant 1 on the configured port; any other UDP is ordinary traffic.
        let gue_port = DECAP_CONFIG.get(0).map_or([0; 2], |c| c.gue_port);
        match read::<[u8; 2]>(ctx, l3 + outer_len + 2) {
            Some(port) if gue_port != [0; 2] && port == gue_port => outer_len += UDP_LEN,
            _ => return Verdict::Passed,
        }
    }
    // SAFETY: hash map values stay valid for this program run.
    if unsafe { DECAP_LOCAL.get(local) }.is_none() {
        return Verdict::NotLocal;
    }
    let inner = l3 + outer_len;
    // The inner packet's version: IP-in-IP says it in the outer protocol, GUE variant 1 only
    // in the packet itself.
    let (vip, inner_type) = match read::<u8>(ctx, inner).map(|b| b >> 4) {
        Some(4) if outer_proto != IPPROTO_IPV6 => match header::<Ipv4Hdr>(ctx, inner) {
            Some(ip) => (v4_key(ip.dst_addr), ETH_P_IP),
            None => return Verdict::Malformed,
        },
        Some(6) if outer_proto != IPPROTO_IPIP => match header::<Ipv6Hdr>(ctx, inner) {
            Some(ip) => (v6_key(ip.dst_addr), ETH_P_IPV6),
            None => return Verdict::Malformed,
        },
        _ => return Verdict::Malformed,
    };
    // SAFETY: as above.
    if unsafe { DECAP_VIPS.get(vip) }.is_none() {
        return Verdict::NotVip;
    }
    strip(ctx, l3, outer_len, inner_type)
}

/// Removes `outer_len` bytes after the L2 header and sets the ether type to the inner family.
#[inline(always)]
fn strip(ctx: &XdpContext, l2_len: usize, outer_len: usize, inner_type: [u8; 2]) -> Verdict {
    let Some(mut l2) = read::<[u8; VLAN_ETH_LEN]>(ctx, 0) else {
        return Verdict::Malformed;
    };
    if l2_len == VLAN_ETH_LEN {
        l2[16..18].copy_from_slice(&inner_type);
    } else {
        l2[12..14].copy_from_slice(&inner_type);
    }
    // SAFETY: helper call on our own context; every access after it re-checks bounds.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Verdict::Malformed;
    }
    // Written back as 14 or 18 bytes: a VLAN-less frame must not get 4 bytes of L2 copy over
    // the inner IP header.
    let written = if l2_len == VLAN_ETH_LEN {
        write(ctx, 0, l2)
    } else {
        let mut eth = [0u8; ETH_LEN];
        eth.copy_from_slice(&l2[..ETH_LEN]);
        write(ctx, 0, eth)
    };
    match written {
        Some(()) => Verdict::Decapsulated,
        None => Verdict::Malformed,
    }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
