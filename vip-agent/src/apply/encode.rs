//! The datapath's form of a VIP and of a backend: everything the hot path would otherwise work
//! out per packet (outer sources, entropy masks, hash fields, next hop) is resolved here, once.
//! The agent, the tests' fixture and the benchmark all encode through these functions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use vip_common::{
    AddrFamily, BACKEND_F_NEXTHOP, BACKEND_F_PRESENT, Backend, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, IPPROTO_UDP, VIP_F_GUE, VIP_F_HASH_ADDRS_ONLY, VipKey, VipMeta, addr_bytes,
    hash::backend_tag,
};

use crate::{
    config::{EgressConfig, Encapsulation, HashFields, VipConfig},
    net::nexthop::NextHop,
};

/// The node's outer source addresses toward backends of each family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// A VIP's `VipMeta`, pointing at table slot `table`.
pub fn vip_meta(vip: &VipConfig, sources: Sources, vip_id: u32, table: u32) -> VipMeta {
    let mut src_v4 = sources.v4.map_or([0; 4], |a| a.octets());
    let mut src_v4_entropy = [0; 4];
    let mut src_v6 = sources.v6.map_or([0; 16], |a| a.octets());
    let mut src_v6_entropy = [0; 4];
    match vip.source_prefix {
        Some(IpNet::V4(p)) => {
            src_v4 = p.network().octets();
            src_v4_entropy = p.hostmask().octets();
        }
        Some(IpNet::V6(p)) => {
            src_v6 = p.network().octets();
            let host = p.hostmask().octets();
            src_v6_entropy.copy_from_slice(&host[12..]);
        }
        None => {}
    }
    let mut flags = match vip.hash {
        HashFields::FiveTuple => 0,
        HashFields::Addresses => VIP_F_HASH_ADDRS_ONLY,
    };
    if vip.encapsulation == Encapsulation::Gue {
        flags |= VIP_F_GUE;
    }
    VipMeta {
        vip: vip.key(),
        egress_first: 0,
        egress_block_size: 0,
        vip_id,
        table,
        flags,
        hash_port_mask: hash_port_mask(vip.hash),
        udp_idle_ns: vip.udp_idle_timeout.as_nanos() as u64,
        src_v4,
        src_v4_entropy,
        src_v6,
        src_v6_entropy,
        gue_port: vip.gue_port.to_be_bytes(),
        egress_span: 0,
    }
}

/// The key the agent plans an egress address under: all ports, protocol 0 (no packet has it).
/// The datapath holds it as one all-ports entry per protocol ([`datapath_keys`]).
pub fn egress_key(addr: IpAddr) -> VipKey {
    VipKey::new(addr, 0, 0)
}

/// Whether a planned key is an egress address's.
pub fn is_egress_key(key: &VipKey) -> bool {
    key.proto == 0
}

/// The datapath's keys of a planned key: itself for a VIP; for an egress address, an all-ports
/// entry for TCP, UDP and ICMP echo replies.
pub fn datapath_keys(key: &VipKey) -> Vec<VipKey> {
    if !is_egress_key(key) {
        return vec![*key];
    }
    let icmp = if key.family == AddrFamily::V4 as u8 {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    };
    [IPPROTO_TCP, IPPROTO_UDP, icmp]
        .into_iter()
        .map(|proto| VipKey { proto, ..*key })
        .collect()
}

/// An egress address's `VipMeta`: the encapsulation of `vip` (a VIP on the address), the
/// egress range, and table slot `table`, which holds the owner table.
pub fn egress_meta(
    vip: &VipConfig,
    egress: &EgressConfig,
    sources: Sources,
    vip_id: u32,
    table: u32,
) -> VipMeta {
    VipMeta {
        vip: egress_key(egress.vip),
        egress_first: egress.first_port,
        egress_block_size: egress.block_size,
        egress_span: egress.last_port - egress.first_port,
        ..vip_meta(vip, sources, vip_id, table)
    }
}

/// The port bits the flow hash takes for `hash`.
pub fn hash_port_mask(hash: HashFields) -> u32 {
    match hash {
        HashFields::FiveTuple => u32::MAX,
        HashFields::Addresses => 0,
    }
}

/// The `BACKENDS` entry of backend `addr` of VIP `vip`. A backend that is not `present` (down)
/// is written without `BACKEND_F_PRESENT`, so conntrack entries naming it re-hash.
pub fn backend_entry(
    vip: &VipKey,
    addr: IpAddr,
    vip_id: u32,
    present: bool,
    hop: Option<&NextHop>,
) -> Backend {
    let (bytes, family) = addr_bytes(addr);
    let mut flags = 0;
    if present {
        flags |= BACKEND_F_PRESENT;
    }
    if hop.is_some() {
        flags |= BACKEND_F_NEXTHOP;
    }
    Backend {
        addr: bytes,
        family: family as u8,
        flags,
        tag: backend_tag(vip, &bytes),
        ifindex: hop.map_or(0, |h| h.ifindex),
        dst_mac: hop.map_or([0; 6], |h| h.dst_mac),
        src_mac: hop.map_or([0; 6], |h| h.src_mac),
        vip_id,
    }
}
