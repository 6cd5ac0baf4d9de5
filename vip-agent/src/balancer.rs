//! The running load balancer: a validated config applied to the datapath.
//!
//! Backend and VIP ids are stable for as long as the agent runs (a backend keeps its id while any
//! VIP uses it) and freed ids are reused last, so conntrack entries never point at a recycled id
//! soon after a removal. Applying a config changes only what differs: new backends are written
//! first, then each changed VIP gets its new table through a spare slot and an atomic flip, then
//! removed VIPs and unused backends go.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    net::IpAddr,
};

use vip_common::{
    BACKEND_F_NEXTHOP, BACKEND_F_PRESENT, Backend, BackendId, VIP_F_GUE, VIP_F_HASH_ADDRS_ONLY,
    VipKey, VipMeta, addr_bytes,
    maglev::{MaglevBackend, MaglevError, MaglevTable},
};

use crate::{
    config::{Config, Encapsulation, HashFields, VipConfig},
    dataplane::{Dataplane, DataplaneError},
    nexthop::NextHop,
    tables::{TableError, TableSlots},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("VIP {vip}: {source}")]
    Maglev {
        vip: String,
        #[source]
        source: MaglevError,
    },
    #[error("no free {0} id")]
    IdsExhausted(&'static str),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// (label, traffic) per VIP and per backend.
pub type TrafficReport = (
    Vec<(String, vip_common::TrafficCounters)>,
    Vec<(String, vip_common::TrafficCounters)>,
);

/// What an apply changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub vips_published: usize,
    pub vips_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
}

/// Stable small ids for keys; freed ids are reused last (FIFO).
#[derive(Debug)]
struct Ids<K> {
    by_key: HashMap<K, u32>,
    free: VecDeque<u32>,
}

impl<K: Hash + Eq + Clone> Ids<K> {
    fn new(capacity: u32) -> Self {
        Self {
            by_key: HashMap::new(),
            free: (0..capacity).collect(),
        }
    }

    fn get_or_assign(&mut self, key: &K) -> Option<u32> {
        if let Some(&id) = self.by_key.get(key) {
            return Some(id);
        }
        let id = self.free.pop_front()?;
        self.by_key.insert(key.clone(), id);
        Some(id)
    }

    /// Takes over an id already in use (found in pinned maps).
    fn adopt(&mut self, key: K, id: u32) {
        self.free.retain(|&f| f != id);
        self.by_key.insert(key, id);
    }

    fn release(&mut self, key: &K) -> Option<u32> {
        let id = self.by_key.remove(key)?;
        self.free.push_back(id);
        Some(id)
    }
}

/// The datapath and what has been written into it.
pub struct Balancer {
    dataplane: Dataplane,
    tables: TableSlots,
    backend_ids: Ids<IpAddr>,
    vip_ids: Ids<VipKey>,
    /// Backend entries as written, by address.
    backends: HashMap<IpAddr, Backend>,
    /// VIPs as applied, by key.
    vips: HashMap<VipKey, VipConfig>,
    next_hops: HashMap<IpAddr, NextHop>,
    source_v4: Option<std::net::Ipv4Addr>,
    source_v6: Option<std::net::Ipv6Addr>,
}

impl Balancer {
    pub fn new(dataplane: Dataplane) -> Self {
        let slots = dataplane.options().table_slots;
        Self {
            dataplane,
            tables: TableSlots::new(slots),
            backend_ids: Ids::new(vip_common::layout::MAX_BACKENDS),
            vip_ids: Ids::new(vip_common::layout::MAX_VIPS),
            backends: HashMap::new(),
            vips: HashMap::new(),
            next_hops: HashMap::new(),
            source_v4: None,
            source_v6: None,
        }
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// Takes over the state an earlier agent left in pinned maps: backends keep their ids (so
    /// conntrack entries keep pointing at the right backend) and live tables keep their slots
    /// until the first apply replaces them, so no packet reads a table being rewritten.
    pub fn adopt_pinned_state(&mut self) -> Result<usize, ApplyError> {
        let mut adopted = 0;
        for (id, backend) in self.dataplane.backends()? {
            if let Some(addr) = vip_common::addr_from_bytes(&backend.addr, backend.family) {
                self.backend_ids.adopt(addr, id);
                adopted += 1;
            }
        }
        for (key, meta) in self.dataplane.vips()? {
            self.tables.adopt(key, meta.table);
            self.vip_ids.adopt(key, meta.vip_id);
            adopted += 1;
        }
        Ok(adopted)
    }

    /// Traffic per VIP (labelled like `tcp/198.51.100.1:443`) and per backend address.
    pub fn traffic(&self) -> Result<TrafficReport, ApplyError> {
        let mut vips = Vec::new();
        for (key, vip) in &self.vips {
            if let Some(id) = self.vip_id(key) {
                vips.push((vip.to_string(), self.dataplane.vip_traffic(id)?));
            }
        }
        let mut backends = Vec::new();
        for (addr, id) in &self.backend_ids.by_key {
            backends.push((addr.to_string(), self.dataplane.backend_traffic(*id)?));
        }
        vips.sort_by(|a, b| a.0.cmp(&b.0));
        backends.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((vips, backends))
    }

    /// Every backend address in use.
    pub fn backend_addresses(&self) -> Vec<IpAddr> {
        self.backends.keys().copied().collect()
    }

    /// The id of a backend in use.
    pub fn backend_id(&self, addr: &IpAddr) -> Option<BackendId> {
        self.backend_ids.by_key.get(addr).copied()
    }

    /// The `vip_id` (index of its counters) of a VIP in use.
    pub fn vip_id(&self, key: &VipKey) -> Option<u32> {
        self.vip_ids.by_key.get(key).copied()
    }

    /// Applies `config`, changing only what differs from what is applied.
    pub fn apply(&mut self, config: &Config) -> Result<ApplyReport, ApplyError> {
        let mut report = ApplyReport::default();
        let sources_changed =
            self.source_v4 != config.node.source_v4 || self.source_v6 != config.node.source_v6;
        self.source_v4 = config.node.source_v4;
        self.source_v6 = config.node.source_v6;

        // 1. Backends first: a table must never name an empty backend slot.
        let mut wanted: Vec<IpAddr> = config
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.address))
            .collect();
        wanted.sort();
        wanted.dedup();
        for &addr in &wanted {
            if self.write_backend(addr)? {
                report.backends_written += 1;
            }
        }

        // 2. New and changed VIPs: whole table into a spare slot, then the flip.
        for vip in &config.vips {
            let key = vip.key();
            if !sources_changed && self.vips.get(&key) == Some(vip) {
                continue;
            }
            self.publish(vip)?;
            self.vips.insert(key, vip.clone());
            report.vips_published += 1;
        }

        // 3. VIPs gone from the config.
        let gone: Vec<VipKey> = self
            .vip_ids
            .by_key
            .keys()
            .filter(|k| !config.vips.iter().any(|v| v.key() == **k))
            .copied()
            .collect();
        for key in gone {
            self.tables.remove(&mut self.dataplane, &key)?;
            self.vips.remove(&key);
            self.vip_ids.release(&key);
            report.vips_removed += 1;
        }

        // 4. Backends no table names any more: emptied, so conntrack entries re-hash.
        let unused: Vec<IpAddr> = self
            .backend_ids
            .by_key
            .keys()
            .filter(|a| wanted.binary_search(a).is_err())
            .copied()
            .collect();
        for addr in unused {
            if let Some(id) = self.backend_ids.release(&addr) {
                self.dataplane
                    .set_backend(id, &bytemuck::Zeroable::zeroed())?;
            }
            self.backends.remove(&addr);
            report.backends_removed += 1;
        }
        Ok(report)
    }

    /// Updates next hops; rewrites the backends whose next hop changed. Returns how many.
    pub fn set_next_hops(&mut self, hops: HashMap<IpAddr, NextHop>) -> Result<usize, ApplyError> {
        self.next_hops = hops;
        let mut changed = 0;
        for addr in self.backend_addresses() {
            if self.write_backend(addr)? {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Writes a backend entry if it differs from what is written; true if written.
    fn write_backend(&mut self, addr: IpAddr) -> Result<bool, ApplyError> {
        let id = self
            .backend_ids
            .get_or_assign(&addr)
            .ok_or(ApplyError::IdsExhausted("backend"))?;
        let (bytes, family) = addr_bytes(addr);
        let hop = self.next_hops.get(&addr);
        let entry = Backend {
            addr: bytes,
            family: family as u8,
            flags: BACKEND_F_PRESENT | if hop.is_some() { BACKEND_F_NEXTHOP } else { 0 },
            _pad: [0; 2],
            ifindex: hop.map_or(0, |h| h.ifindex),
            dst_mac: hop.map_or([0; 6], |h| h.dst_mac),
            src_mac: hop.map_or([0; 6], |h| h.src_mac),
        };
        if self.backends.get(&addr) == Some(&entry) {
            return Ok(false);
        }
        self.dataplane.set_backend(id, &entry)?;
        self.backends.insert(addr, entry);
        Ok(true)
    }

    fn publish(&mut self, vip: &VipConfig) -> Result<(), ApplyError> {
        let key = vip.key();
        let vip_id = self
            .vip_ids
            .get_or_assign(&key)
            .ok_or(ApplyError::IdsExhausted("VIP"))?;
        let members: Vec<MaglevBackend> = vip
            .backends
            .iter()
            .map(|b| MaglevBackend {
                addr: b.address,
                weight: b.table_weight(),
                id: self.backend_ids.by_key[&b.address],
            })
            .collect();
        let table = MaglevTable::build(self.dataplane.options().table_size, &members).map_err(
            |source| ApplyError::Maglev {
                vip: vip.to_string(),
                source,
            },
        )?;
        let meta = self.meta(vip, vip_id);
        self.tables
            .publish(&mut self.dataplane, key, meta, &table)?;
        Ok(())
    }

    /// The datapath's view of a VIP: sources and entropy masks resolved here, once.
    fn meta(&self, vip: &VipConfig, vip_id: u32) -> VipMeta {
        let mut src_v4 = self.source_v4.map_or([0; 4], |a| a.octets());
        let mut src_v4_entropy = [0; 4];
        let mut src_v6 = self.source_v6.map_or([0; 16], |a| a.octets());
        let mut src_v6_entropy = [0; 4];
        match vip.source_prefix {
            Some(ipnet::IpNet::V4(p)) => {
                src_v4 = p.network().octets();
                src_v4_entropy = p.hostmask().octets();
            }
            Some(ipnet::IpNet::V6(p)) => {
                src_v6 = p.network().octets();
                let host = p.hostmask().octets();
                src_v6_entropy.copy_from_slice(&host[12..]);
            }
            None => {}
        }
        let (mut flags, hash_port_mask) = match vip.hash {
            HashFields::FiveTuple => (0, u32::MAX),
            HashFields::Addresses => (VIP_F_HASH_ADDRS_ONLY, 0),
        };
        if vip.encapsulation == Encapsulation::Gue {
            flags |= VIP_F_GUE;
        }
        VipMeta {
            vip_id,
            table: 0,
            flags,
            hash_port_mask,
            udp_idle_ns: vip.udp_idle_timeout.as_nanos() as u64,
            src_v4,
            src_v4_entropy,
            src_v6,
            src_v6_entropy,
            gue_port: vip.gue_port.to_be_bytes(),
            _pad: [0; 2],
        }
    }
}
