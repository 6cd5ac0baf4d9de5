//! Parsing: Ethernet (one optional 802.1Q tag), IPv4, IPv6, TCP, UDP, ICMP errors about flows of
//! a VIP, and ICMP echo replies to egress addresses.
//!
//! Headers are read in place through bounds-checked pointers (the IP header starts at 14, or 18
//! behind a VLAN tag), not copied, to keep the stack small. Anything not understood, and anything not for a VIP,
//! is passed untouched; a packet to a VIP that is malformed, fragmented or carries IP options is
//! dropped and counted, never sent anywhere but a configured backend.

use aya_ebpf::programs::XdpContext;
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use vip_common::{
    AddrFamily, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Outcome,
    VIP_F_HASH_ADDRS_ONLY, VipKey, VipMeta,
    hash::{vip_filter_bit, vip_filter_bit_v4},
};

use vip_ebpf::packet::{
    self, ETH_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ICMP_LEN, IPV4_LEN, IPV6_LEN, TCP_LEN,
    UDP_LEN, VLAN_ETH_LEN, header, read,
};

use crate::{
    client::Inner,
    maps::{VIP_FILTER, VIPS},
    select::ConnPolicy,
};
const TCP_FLAGS_OFF: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Offset of the echo identifier in an ICMP header: the "port" of an echo flow.
const ICMP_ECHO_ID_OFF: usize = 4;

/// IPv6 traffic class, the field the outer header copies.
#[inline(always)]
fn traffic_class(ip: &Ipv6Hdr) -> u8 {
    (ip.vcf[0] << 4) | (ip.vcf[1] >> 4)
}

/// Parses a frame: a packet that may be for a VIP, or what became of it.
#[inline(always)]
pub(crate) fn classify(ctx: &XdpContext) -> Parsed {
    let Some(ether_type) = read::<[u8; 2]>(ctx, 12) else {
        return Err(Outcome::Passed);
    };
    if ether_type == ETH_P_8021Q {
        let Some(inner_type) = read::<[u8; 2]>(ctx, 16) else {
            return Err(Outcome::Passed);
        };
        return by_ether_type(ctx, VLAN_ETH_LEN, inner_type);
    }
    by_ether_type(ctx, ETH_LEN, ether_type)
}

#[inline(always)]
fn by_ether_type(ctx: &XdpContext, l3: usize, ether_type: [u8; 2]) -> Parsed {
    match ether_type {
        ETH_P_IP => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        _ => Err(Outcome::Passed),
    }
}

/// Whether a destination may be a VIP: false means certainly not (its filter bit is clear).
#[inline(always)]
fn maybe_vip(bit: u32) -> bool {
    VIP_FILTER
        .get(bit >> 6)
        .is_none_or(|word| word & (1u64 << (bit & 63)) != 0)
}

/// The VIP a flow is addressed to: the exact port first, then the all-ports VIP.
#[inline(always)]
pub(crate) fn find_vip(flow: &FlowKey) -> Option<&'static VipMeta> {
    let mut key = VipKey {
        addr: flow.dst,
        port: flow.dst_port,
        proto: flow.proto,
        family: flow.family,
    };
    // SAFETY: values of a hash map stay valid for the rest of this program run (RCU).
    if let Some(meta) = unsafe { VIPS.get(key) } {
        return Some(meta);
    }
    key.port = [0; 2];
    // SAFETY: as above.
    unsafe { VIPS.get(key) }
}

/// Reads the ports at `l4` into `flow`, and for TCP whether this is a SYN (without ACK).
/// `None` if the transport header is truncated.
#[inline(always)]
fn ports_and_syn(ctx: &XdpContext, l4: usize, flow: &mut FlowKey) -> Option<bool> {
    let ports = read::<[u8; 4]>(ctx, l4)?;
    flow.set_ports([ports[0], ports[1]], [ports[2], ports[3]]);
    if flow.proto != IPPROTO_TCP {
        return Some(false);
    }
    let flags = read::<u8>(ctx, l4 + TCP_FLAGS_OFF)?;
    Some(flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

#[inline(always)]
fn min_l4_len(proto: u8) -> usize {
    if proto == IPPROTO_TCP {
        TCP_LEN
    } else {
        UDP_LEN
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Parsed {
    let Some(ip) = header::<Ipv4Hdr>(ctx, l3) else {
        return Err(Outcome::Passed);
    };
    if ip.vihl >> 4 != 4 || !maybe_vip(vip_filter_bit_v4(ip.dst_addr)) {
        return Err(Outcome::Passed);
    }
    if ip.proto == IPPROTO_ICMP {
        return icmp4(ctx, l3, ip);
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Err(Outcome::Passed);
    }
    let mut flow = FlowKey::v4(ip.src_addr, ip.dst_addr, ip.proto);
    let fragment = u16::from_be_bytes(ip.frags) & 0x3fff != 0;
    if ip.vihl != 0x45 || fragment {
        return ipv4_irregular(ctx, l3, ip, flow, fragment);
    }

    let Some(syn) = ports_and_syn(ctx, l3 + IPV4_LEN, &mut flow) else {
        // Too short for ports: not something we could ever forward correctly.
        return Err(Outcome::Passed);
    };
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    let malformed = tot_len < IPV4_LEN + min_l4_len(ip.proto) || l3 + tot_len > packet::len(ctx);
    Ok(Candidate {
        l2_len: l3,
        meta: None,
        flow,
        policy: ConnPolicy::for_packet(ip.proto, syn),
        inner: Inner {
            len: tot_len as u16,
            tos: ip.tos,
            family: AddrFamily::V4,
        },
        malformed,
    })
}

/// IPv4 with options or fragmented: the VIP is found by address (all-ports VIP). An
/// addresses-only VIP forwards fragments (they hash alike without ports); everything else to a
/// VIP is dropped and counted.
#[inline(always)]
fn ipv4_irregular(
    ctx: &XdpContext,
    l3: usize,
    ip: &Ipv4Hdr,
    flow: FlowKey,
    fragment: bool,
) -> Parsed {
    let Some(meta) = find_vip(&flow) else {
        return Err(Outcome::Passed);
    };
    if ip.vihl != 0x45 {
        return Err(Outcome::DropIpOptions);
    }
    if !fragment || meta.flags & VIP_F_HASH_ADDRS_ONLY == 0 {
        return Err(Outcome::DropFragment);
    }
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if tot_len < IPV4_LEN || l3 + tot_len > packet::len(ctx) {
        return Err(Outcome::DropMalformed);
    }
    let inner = Inner {
        len: tot_len as u16,
        tos: ip.tos,
        family: AddrFamily::V4,
    };
    Ok(Candidate {
        l2_len: l3,
        meta: Some(meta),
        flow,
        policy: ConnPolicy::Stateless,
        inner,
        malformed: false,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize) -> Parsed {
    let Some(ip) = header::<Ipv6Hdr>(ctx, l3) else {
        return Err(Outcome::Passed);
    };
    if ip.vcf[0] >> 4 != 6 || !maybe_vip(vip_filter_bit(&ip.dst_addr)) {
        return Err(Outcome::Passed);
    }
    if ip.next_hdr == IPPROTO_ICMPV6 {
        return icmp6(ctx, l3, ip);
    }
    // Extension headers (fragments among them) are not parsed: such packets pass.
    if ip.next_hdr != IPPROTO_TCP && ip.next_hdr != IPPROTO_UDP {
        return Err(Outcome::Passed);
    }
    let mut flow = FlowKey::v6(ip.src_addr, ip.dst_addr, ip.next_hdr);
    let Some(syn) = ports_and_syn(ctx, l3 + IPV6_LEN, &mut flow) else {
        return Err(Outcome::Passed);
    };
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    let malformed =
        payload_len < min_l4_len(ip.next_hdr) || l3 + IPV6_LEN + payload_len > packet::len(ctx);
    Ok(Candidate {
        l2_len: l3,
        meta: None,
        flow,
        policy: ConnPolicy::for_packet(ip.next_hdr, syn),
        inner: Inner {
            len: (IPV6_LEN + payload_len) as u16,
            tos: traffic_class(ip),
            family: AddrFamily::V6,
        },
        malformed,
    })
}

/// What an ICMP message to a VIP address is to the load balancer: "too big" errors go to the
/// backend of the flow they quote (the flow's conntrack entry, else its VIP's answer); other
/// errors, and echo replies, only when they belong to an egress flow (the block's owner).
#[inline(always)]
fn icmp_policy(too_big: bool) -> ConnPolicy {
    if too_big {
        ConnPolicy::LookupOnly
    } else {
        ConnPolicy::EgressOnly
    }
}

/// ICMP to a VIP address: an echo reply (to a backend's egress ping), or an error about a
/// packet a backend sent from the VIP, which goes to the backend that owns the flow, found from
/// the quoted header (reversed: the view of the flow from outside).
#[inline(always)]
fn icmp4(ctx: &XdpContext, l3: usize, ip: &Ipv4Hdr) -> Parsed {
    const ICMP: usize = IPV4_LEN;
    const QUOTED: usize = ICMP + ICMP_LEN;
    if ip.vihl != 0x45 {
        return Err(Outcome::Passed);
    }
    let Some([icmp_type, code]) = read::<[u8; 2]>(ctx, l3 + ICMP) else {
        return Err(Outcome::Passed);
    };
    let len = usize::from(u16::from_be_bytes(ip.tot_len));
    let error = (len, ip.tos, AddrFamily::V4);
    if icmp_type == ICMP_ECHO_REPLY {
        let flow = FlowKey::v4(ip.src_addr, ip.dst_addr, IPPROTO_ICMP);
        return echo_reply(ctx, l3, l3 + ICMP, flow, error);
    }
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return Err(Outcome::Passed);
    }
    let Some(quoted) = header::<Ipv4Hdr>(ctx, l3 + QUOTED) else {
        return Err(Outcome::Passed);
    };
    // The quoted packet was sent by a backend from the VIP.
    if quoted.vihl != 0x45
        || quoted.src_addr != ip.dst_addr
        || (quoted.proto != IPPROTO_TCP && quoted.proto != IPPROTO_UDP)
    {
        return Err(Outcome::Passed);
    }
    let flow = FlowKey::v4(quoted.dst_addr, quoted.src_addr, quoted.proto);
    let flow = quoted_flow(ctx, l3 + QUOTED + IPV4_LEN, flow)?;
    let policy = icmp_policy(icmp_type == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED);
    icmp_to_backend(ctx, l3, (flow, policy), error, QUOTED + IPV4_LEN + 4)
}

/// ICMPv6 to a VIP address: as [`icmp4`].
#[inline(always)]
fn icmp6(ctx: &XdpContext, l3: usize, ip: &Ipv6Hdr) -> Parsed {
    const QUOTED: usize = IPV6_LEN + ICMP_LEN;
    let Some(icmp_type) = read::<u8>(ctx, l3 + IPV6_LEN) else {
        return Err(Outcome::Passed);
    };
    let len = IPV6_LEN + usize::from(u16::from_be_bytes(ip.payload_len));
    let error = (len, traffic_class(ip), AddrFamily::V6);
    if icmp_type == ICMPV6_ECHO_REPLY {
        let flow = FlowKey::v6(ip.src_addr, ip.dst_addr, IPPROTO_ICMPV6);
        return echo_reply(ctx, l3, l3 + IPV6_LEN, flow, error);
    }
    if icmp_type != ICMPV6_PKT_TOOBIG
        && icmp_type != ICMPV6_DEST_UNREACH
        && icmp_type != ICMPV6_TIME_EXCEEDED
    {
        return Err(Outcome::Passed);
    }
    let Some(quoted) = header::<Ipv6Hdr>(ctx, l3 + QUOTED) else {
        return Err(Outcome::Passed);
    };
    if quoted.vcf[0] >> 4 != 6
        || quoted.src_addr != ip.dst_addr
        || (quoted.next_hdr != IPPROTO_TCP && quoted.next_hdr != IPPROTO_UDP)
    {
        return Err(Outcome::Passed);
    }
    let flow = FlowKey::v6(quoted.dst_addr, quoted.src_addr, quoted.next_hdr);
    let flow = quoted_flow(ctx, l3 + QUOTED + IPV6_LEN, flow)?;
    let policy = icmp_policy(icmp_type == ICMPV6_PKT_TOOBIG);
    icmp_to_backend(ctx, l3, (flow, policy), error, QUOTED + IPV6_LEN + 4)
}

/// An echo reply: its identifier is the flow's port (what source NAT on the backend mapped
/// into the backend's block).
#[inline(always)]
fn echo_reply(
    ctx: &XdpContext,
    l3: usize,
    icmp: usize,
    mut flow: FlowKey,
    error: (usize, u8, AddrFamily),
) -> Parsed {
    let Some(id) = read::<[u8; 2]>(ctx, icmp + ICMP_ECHO_ID_OFF) else {
        return Err(Outcome::Passed);
    };
    flow.set_ports(flow.src_port, id);
    let min_len = icmp - l3 + ICMP_LEN;
    icmp_to_backend(ctx, l3, (flow, ConnPolicy::EgressOnly), error, min_len)
}

/// The client's view of the flow an ICMP error quotes (a backend sent the quoted packet from
/// the VIP, so its ports are swapped).
#[inline(always)]
fn quoted_flow(ctx: &XdpContext, ports_at: usize, mut flow: FlowKey) -> Result<FlowKey, Outcome> {
    let ports = read::<[u8; 4]>(ctx, ports_at).ok_or(Outcome::Passed)?;
    flow.set_ports([ports[2], ports[3]], [ports[0], ports[1]]);
    Ok(flow)
}

/// An ICMP message — `(length of its IP packet, TOS, family)`; at least `min_len` bytes, all
/// in the frame — for the backend of the flow it is about, found as `policy` says.
#[inline(always)]
fn icmp_to_backend(
    ctx: &XdpContext,
    l3: usize,
    (flow, policy): (FlowKey, ConnPolicy),
    (len, tos, family): (usize, u8, AddrFamily),
    min_len: usize,
) -> Parsed {
    Ok(Candidate {
        l2_len: l3,
        meta: None,
        flow,
        policy,
        inner: Inner {
            len: len as u16,
            tos,
            family,
        },
        malformed: len < min_len || l3 + len > packet::len(ctx),
    })
}

/// A packet that may be for a VIP, as parsed: what resolving its VIP needs.
pub(crate) struct Candidate {
    /// Length of the L2 header (where the IP header starts).
    pub l2_len: usize,
    /// The VIP, when parsing already had to find it (fragments).
    pub meta: Option<&'static VipMeta>,
    /// The flow as the client sent it: conntrack key and hash input.
    pub flow: FlowKey,
    pub policy: ConnPolicy,
    pub inner: Inner,
    /// Its lengths are inconsistent: dropped if it is for a VIP, passed if not.
    pub malformed: bool,
}

/// A packet that may be for a VIP, or what else became of it.
pub(crate) type Parsed = Result<Candidate, Outcome>;
