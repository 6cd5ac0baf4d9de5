//! The datapath's form of a VIP and of a backend: everything the hot path would otherwise work
//! out per packet (outer sources, entropy masks, hash fields, next hop) is resolved here, once.
//! The agent, the tests' fixture and the benchmark all encode through these functions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use vip_common::{
    BACKEND_F_NEXTHOP, BACKEND_F_PRESENT, Backend, VIP_F_GUE, VIP_F_HASH_ADDRS_ONLY, VipKey,
    VipMeta, addr_bytes, hash::backend_tag,
};

use crate::{
    config::{Encapsulation, HashFields, VipConfig},
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
        _pad_key: [0; 4],
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
        _pad: [0; 2],
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
