//! The running load balancer: a validated config applied to the datapath.
//!
//! Backend and VIP ids are stable for as long as the agent runs (a backend keeps its id while any
//! VIP uses it) and freed ids are reused last, so conntrack entries never point at a recycled id
//! soon after a removal. Applying a config changes only what differs: new backends are written
//! first, then each changed VIP gets its new table through a spare slot and an atomic flip, then
//! removed VIPs and unused backends go.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::Hash,
    net::IpAddr,
};

use vip_common::{
    BACKEND_F_NEXTHOP, BACKEND_F_PRESENT, Backend, TrafficCounters, VIP_F_GUE,
    VIP_F_HASH_ADDRS_ONLY, VipKey, VipMeta, addr_bytes,
    hash::backend_tag,
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

/// (VIP label, traffic) per VIP and ((VIP label, backend address), traffic) per backend.
pub type TrafficReport = (
    Vec<(String, TrafficCounters)>,
    Vec<((String, String), TrafficCounters)>,
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

/// One backend of one VIP: the unit of ids, table membership, health and drain.
pub type BackendKey = (VipKey, IpAddr);

/// Run-time condition of a backend, on top of its config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Takes new flows (if its config says so).
    Up,
    /// Drained at run time: no new flows, established ones continue.
    Drained,
    /// Failed its health checks: out of the table, and its established flows move too.
    Down,
}

/// The datapath and what has been written into it.
pub struct Balancer {
    dataplane: Dataplane,
    tables: TableSlots,
    backend_ids: Ids<BackendKey>,
    vip_ids: Ids<VipKey>,
    /// Backend entries as written.
    backends: HashMap<BackendKey, Backend>,
    /// VIPs as applied, with the table weights they were published with.
    vips: HashMap<VipKey, (VipConfig, Vec<u32>)>,
    conditions: HashMap<BackendKey, Condition>,
    next_hops: HashMap<IpAddr, NextHop>,
    source_v4: Option<std::net::Ipv4Addr>,
    source_v6: Option<std::net::Ipv6Addr>,
    /// The conntrack insert limit written, once written.
    insert_limit: Option<u32>,
    /// Per VIP, what backends that have left it had sent: a VIP's traffic is its backends'
    /// (the datapath counts per backend only), and must not fall when one leaves.
    retired: HashMap<VipKey, TrafficCounters>,
}

impl Balancer {
    /// The datapath's id of a backend of a VIP, once applied.
    pub fn backend_id(&self, key: &BackendKey) -> Option<vip_common::BackendId> {
        self.backend_ids.by_key.get(key).copied()
    }

    pub fn new(dataplane: Dataplane) -> Self {
        let options = dataplane.options();
        let (slots, max_vips, max_backends) =
            (options.table_slots, options.max_vips, options.max_backends);
        Self {
            dataplane,
            tables: TableSlots::new(slots),
            backend_ids: Ids::new(max_backends),
            vip_ids: Ids::new(max_vips),
            backends: HashMap::new(),
            vips: HashMap::new(),
            conditions: HashMap::new(),
            next_hops: HashMap::new(),
            source_v4: None,
            source_v6: None,
            insert_limit: None,
            retired: HashMap::new(),
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
        let vips = self.dataplane.vips()?;
        for (id, backend) in self.dataplane.backends()? {
            let vip = vips.iter().find(|(_, m)| m.vip_id == backend.vip_id);
            let addr = vip_common::addr_from_bytes(&backend.addr, backend.family);
            if let (Some((key, _)), Some(addr)) = (vip, addr) {
                self.backend_ids.adopt((*key, addr), id);
                adopted += 1;
            }
        }
        for (key, meta) in vips {
            self.tables.adopt(key, meta.table);
            self.vip_ids.adopt(key, meta.vip_id);
            adopted += 1;
        }
        Ok(adopted)
    }

    /// Traffic per VIP (labelled like `tcp/198.51.100.1:443`) and per backend of each VIP. A
    /// VIP's is the sum of its backends', those that left it included.
    pub fn traffic(&self) -> Result<TrafficReport, ApplyError> {
        let mut vips = Vec::new();
        let mut backends = Vec::new();
        for (key, (vip, _)) in &self.vips {
            let mut total = self.retired.get(key).copied().unwrap_or_default();
            for b in &vip.backends {
                if let Some(&id) = self.backend_ids.by_key.get(&(*key, b.address)) {
                    let traffic = self.dataplane.backend_traffic(id)?;
                    total += traffic;
                    let label = (vip.to_string(), b.address.to_string());
                    backends.push((label, traffic));
                }
            }
            vips.push((vip.to_string(), total));
        }
        vips.sort_by(|a, b| a.0.cmp(&b.0));
        backends.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((vips, backends))
    }

    /// Every backend address in use.
    pub fn backend_addresses(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.backends.keys().map(|(_, a)| *a).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The `vip_id` (index of its counters) of a VIP in use.
    pub fn vip_id(&self, key: &VipKey) -> Option<u32> {
        self.vip_ids.by_key.get(key).copied()
    }

    /// Whether a VIP has a backend that takes new flows now (config, health and drain): only
    /// such VIPs are announced.
    pub fn usable(&self, key: &VipKey) -> bool {
        self.vips
            .get(key)
            .is_some_and(|(_, weights)| weights.iter().any(|w| *w > 0))
    }

    /// A backend's run-time condition.
    pub fn condition(&self, key: &BackendKey) -> Condition {
        self.conditions.get(key).copied().unwrap_or(Condition::Up)
    }

    /// Changes a backend's run-time condition and applies it: its VIP's table is recomputed
    /// (Maglev moves only that backend's slots) and, for `Down`, its entry is emptied so its
    /// established flows move too. Returns whether anything changed.
    pub fn set_condition(
        &mut self,
        key: BackendKey,
        condition: Condition,
    ) -> Result<bool, ApplyError> {
        if self.condition(&key) == condition {
            return Ok(false);
        }
        self.conditions.insert(key, condition);
        self.write_backend(key)?;
        if let Some((vip, _)) = self.vips.get(&key.0).cloned() {
            self.publish(&vip)?;
        }
        Ok(true)
    }

    /// Applies `config`, changing only what differs from what is applied.
    pub fn apply(&mut self, config: &Config) -> Result<ApplyReport, ApplyError> {
        let mut report = ApplyReport::default();
        let sources_changed =
            self.source_v4 != config.node.source_v4 || self.source_v6 != config.node.source_v6;
        self.source_v4 = config.node.source_v4;
        self.source_v6 = config.node.source_v6;
        if self.insert_limit != Some(config.node.conntrack_insert_limit) {
            self.dataplane
                .set_conntrack_insert_limit(config.node.conntrack_insert_limit)?;
            self.insert_limit = Some(config.node.conntrack_insert_limit);
        }

        // 1. Backends first: a table must never name an empty backend slot.
        let wanted: Vec<BackendKey> = config
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(move |b| (v.key(), b.address)))
            .collect();
        for vip in &config.vips {
            self.vip_ids
                .get_or_assign(&vip.key())
                .ok_or(ApplyError::IdsExhausted("VIP"))?;
        }
        for &key in &wanted {
            if self.write_backend(key)? {
                report.backends_written += 1;
            }
        }

        // 2. New and changed VIPs: whole table into a spare slot, then the flip.
        for vip in &config.vips {
            let key = vip.key();
            if !sources_changed && self.vips.get(&key).is_some_and(|(v, _)| v == vip) {
                continue;
            }
            self.publish(vip)?;
            report.vips_published += 1;
        }

        // 3. VIPs gone from the config. (Sets: a node may have 10,000 VIPs.)
        let configured: HashSet<VipKey> = config.vips.iter().map(|v| v.key()).collect();
        let gone: Vec<VipKey> = self
            .vip_ids
            .by_key
            .keys()
            .filter(|k| !configured.contains(*k))
            .copied()
            .collect();
        for key in gone {
            self.tables.remove(&mut self.dataplane, &key)?;
            self.vips.remove(&key);
            self.vip_ids.release(&key);
            self.retired.remove(&key);
            report.vips_removed += 1;
        }

        // 4. Backends no table names any more: emptied, so conntrack entries re-hash.
        let wanted: HashSet<BackendKey> = wanted.into_iter().collect();
        let unused: Vec<BackendKey> = self
            .backend_ids
            .by_key
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in unused {
            if let Some(id) = self.backend_ids.release(&key) {
                self.dataplane
                    .set_backend(id, &bytemuck::Zeroable::zeroed())?;
                // Its count stays with its VIP (if the VIP stays); its id starts from zero.
                let sent = self.dataplane.backend_traffic(id)?;
                if self.vips.contains_key(&key.0) {
                    *self.retired.entry(key.0).or_default() += sent;
                }
                self.dataplane.reset_backend_traffic(id)?;
            }
            self.backends.remove(&key);
            self.conditions.remove(&key);
            report.backends_removed += 1;
        }
        Ok(report)
    }

    /// Updates next hops; rewrites the backends whose next hop changed. Returns how many.
    pub fn set_next_hops(&mut self, hops: HashMap<IpAddr, NextHop>) -> Result<usize, ApplyError> {
        self.next_hops = hops;
        let mut changed = 0;
        let keys: Vec<BackendKey> = self.backends.keys().copied().collect();
        for key in keys {
            if self.write_backend(key)? {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Writes a backend entry if it differs from what is written; true if written. A backend
    /// that is down is written empty: conntrack entries pointing at it re-hash.
    fn write_backend(&mut self, key: BackendKey) -> Result<bool, ApplyError> {
        let id = self
            .backend_ids
            .get_or_assign(&key)
            .ok_or(ApplyError::IdsExhausted("backend"))?;
        let vip_id = self.vip_ids.by_key.get(&key.0).copied().unwrap_or(0);
        let (bytes, family) = addr_bytes(key.1);
        let hop = self.next_hops.get(&key.1);
        let present = if self.condition(&key) == Condition::Down {
            0
        } else {
            BACKEND_F_PRESENT
        };
        let entry = Backend {
            addr: bytes,
            family: family as u8,
            flags: present | if hop.is_some() { BACKEND_F_NEXTHOP } else { 0 },
            tag: backend_tag(&key.0, &bytes),
            ifindex: hop.map_or(0, |h| h.ifindex),
            dst_mac: hop.map_or([0; 6], |h| h.dst_mac),
            src_mac: hop.map_or([0; 6], |h| h.src_mac),
            vip_id,
        };
        if self.backends.get(&key) == Some(&entry) {
            return Ok(false);
        }
        self.dataplane.set_backend(id, &entry)?;
        self.backends.insert(key, entry);
        Ok(true)
    }

    /// Publishes a VIP's table for its backends' current weights (config, health, drain).
    fn publish(&mut self, vip: &VipConfig) -> Result<(), ApplyError> {
        let key = vip.key();
        let vip_id = self
            .vip_ids
            .get_or_assign(&key)
            .ok_or(ApplyError::IdsExhausted("VIP"))?;
        let weights: Vec<u32> = vip
            .backends
            .iter()
            .map(|b| match self.condition(&(key, b.address)) {
                Condition::Up => b.table_weight(),
                Condition::Drained | Condition::Down => 0,
            })
            .collect();
        let members: Vec<MaglevBackend> = vip
            .backends
            .iter()
            .zip(&weights)
            .map(|(b, &weight)| MaglevBackend {
                addr: b.address,
                weight,
                id: self.backend_ids.by_key[&(key, b.address)],
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
        self.vips.insert(key, (vip.clone(), weights));
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
            vip: vip.key(),
            _pad_key: [0; 4],
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
