//! Applying a target (what the maps should hold) to the datapath: a pure [`plan`] of map writes,
//! then its execution through a [`MapWriter`]. Nothing is written unless the whole change fits:
//! ids and table slots are checked at the transition's peak while planning.
//!
//! Backend and VIP ids are stable while the agent runs (a backend keeps its id while its VIP
//! lists it) and freed ids are reused last, so conntrack entries never point at a recycled id
//! soon after a removal (and entries carry the backend's tag for when they do).

pub mod encode;
mod ids;
mod plan;
mod slots;
mod state;
mod target;
mod writer;

use std::{collections::HashMap, net::IpAddr};

use vip_common::{Backend, BackendId, TrafficCounters, VipKey, VipMeta, maglev::MaglevTable};

pub use encode::Sources;
pub use plan::{Plan, PlanError};
pub use slots::TableSlots;
pub use state::Capacity;
pub use target::{BackendKey, BackendTarget, EgressTarget, Target, VipTarget};
pub use writer::MapWriter;

use crate::{config::VipName, net::nexthop::NextHop};
use plan::Step;
use state::{AppliedVip, State, TableSource};

/// Why an apply failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The change does not fit; nothing was written.
    #[error("the change cannot be applied; nothing was written")]
    Plan(#[from] PlanError),
    /// A map write failed part way; the next apply writes what differs again.
    #[error("writing the datapath's maps failed part way")]
    Write(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What an apply changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub vips_published: usize,
    pub vips_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
}

/// A VIP's traffic accounts: what its backends send is counted per backend id in the
/// datapath; what departed backends sent is kept here, so a VIP's total never falls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipAccount {
    pub name: VipName,
    pub retired: TrafficCounters,
    pub backends: Vec<(IpAddr, BackendId)>,
}

/// The applied state, indexed the ways flow-state sharing asks it.
#[derive(Debug, Default)]
pub struct Lookup {
    by_id: HashMap<u32, (VipKey, VipMeta)>,
    vips: HashMap<VipKey, VipMeta>,
    backends_by_id: HashMap<BackendId, (BackendKey, Backend)>,
    backends: HashMap<BackendKey, (BackendId, Backend)>,
    tables: HashMap<VipKey, MaglevTable>,
}

impl Lookup {
    /// A VIP by its id.
    pub fn vip_by_id(&self, vip_id: u32) -> Option<&(VipKey, VipMeta)> {
        self.by_id.get(&vip_id)
    }

    pub fn vip(&self, key: &VipKey) -> Option<&VipMeta> {
        self.vips.get(key)
    }

    /// A backend entry by its id, with the (VIP, address) it stands for.
    pub fn backend_by_id(&self, id: BackendId) -> Option<&(BackendKey, Backend)> {
        self.backends_by_id.get(&id)
    }

    pub fn backend(&self, key: &BackendKey) -> Option<&(BackendId, Backend)> {
        self.backends.get(key)
    }

    /// A VIP's live Maglev table.
    pub fn table(&self, key: &VipKey) -> Option<&MaglevTable> {
        self.tables.get(key)
    }
}

/// The applied state of a load-balancer node and the traffic of departed backends.
#[derive(Debug)]
pub struct Applied {
    state: State,
    /// Per VIP, what backends that have left it had sent.
    retired: HashMap<VipKey, TrafficCounters>,
}

impl Applied {
    /// Nothing applied yet, in a datapath of `capacity`.
    pub fn new(capacity: Capacity) -> Self {
        Self {
            state: State::new(capacity),
            retired: HashMap::new(),
        }
    }

    /// Takes over what an earlier agent left in pinned maps: VIPs keep their ids and live
    /// table slots (rewritten by the first apply through a spare slot, so no packet reads a
    /// table being rewritten) and backends keep their ids (conntrack entries keep pointing at
    /// the right backend). Returns how many entries it took over.
    pub fn adopt(
        &mut self,
        vips: &[(VipKey, VipMeta)],
        backends: &[(BackendId, Backend)],
    ) -> usize {
        let state = &mut self.state;
        // An egress address's entries (one per protocol) are one planned key.
        let vips: Vec<(VipKey, VipMeta)> = vips
            .iter()
            .map(|(key, meta)| match meta.egress_block_size {
                0 => (*key, *meta),
                _ => {
                    let key = VipKey { proto: 0, ..*key };
                    (key, VipMeta { vip: key, ..*meta })
                }
            })
            .collect();
        for (key, meta) in &vips {
            state.slots.adopt(*key, meta.table);
            state.vip_ids.adopt(*key, meta.vip_id);
            let source = match meta.egress_block_size {
                0 => TableSource::Maglev(Vec::new()),
                _ => TableSource::Owners(Vec::new()),
            };
            state.vips.insert(
                *key,
                AppliedVip {
                    meta: *meta,
                    source,
                },
            );
        }
        let mut adopted = state.vips.len();
        for (id, entry) in backends {
            let vip = vips.iter().find(|(_, m)| m.vip_id == entry.vip_id);
            let addr = vip_common::addr_from_bytes(&entry.addr, entry.family);
            if let (Some((key, _)), Some(addr)) = (vip, addr) {
                state.backend_ids.adopt((*key, addr), *id);
                state.backends.insert((*key, addr), *entry);
                adopted += 1;
            }
        }
        adopted
    }

    /// Makes the maps hold `target`: plans the whole change, then writes it. A change that
    /// does not fit is refused with nothing written.
    pub fn apply(
        &mut self,
        target: &Target,
        next_hops: &HashMap<IpAddr, NextHop>,
        writer: &mut impl MapWriter,
    ) -> Result<ApplyReport, ApplyError> {
        let plan = self.plan(target, next_hops)?;
        self.execute(plan, writer)
    }

    /// The writes that would make the maps hold `target`; nothing is written.
    pub fn plan(
        &self,
        target: &Target,
        next_hops: &HashMap<IpAddr, NextHop>,
    ) -> Result<Plan, PlanError> {
        plan::plan(&self.state, target, next_hops)
    }

    /// Writes a plan made from the current state. On a failed write the state stays as it
    /// was; the next apply rewrites what differs from it.
    pub fn execute(
        &mut self,
        plan: Plan,
        writer: &mut impl MapWriter,
    ) -> Result<ApplyReport, ApplyError> {
        let write = |e| ApplyError::Write(Box::new(e));
        let mut report = ApplyReport::default();
        for step in plan.steps {
            match step {
                Step::SetInsertLimit(limit) => writer.set_insert_limit(limit).map_err(write)?,
                Step::SetBackend { id, entry } => {
                    writer.set_backend(id, &entry).map_err(write)?;
                    report.backends_written += 1;
                }
                Step::ReleaseBackend { id, vip } => {
                    let sent = writer.release_backend(id).map_err(write)?;
                    if plan.next.vips.contains_key(&vip) {
                        *self.retired.entry(vip).or_default() += sent;
                    }
                    report.backends_removed += 1;
                }
                Step::WriteTable { slot, table } => {
                    writer.write_table(slot, &table).map_err(write)?;
                    report.vips_published += 1;
                }
                Step::SetVip { key, meta } => writer.set_vip(&key, &meta).map_err(write)?,
                Step::RemoveVip { key } => {
                    writer.remove_vip(&key).map_err(write)?;
                    report.vips_removed += 1;
                }
            }
        }
        self.retired.retain(|k, _| plan.next.vips.contains_key(k));
        self.state = plan.next;
        Ok(report)
    }

    /// VIPs, backends and live Maglev tables as applied, indexed for flow-state sharing.
    pub fn lookup(&self) -> Lookup {
        let state = &self.state;
        let mut lookup = Lookup::default();
        for (key, applied) in &state.vips {
            lookup
                .by_id
                .insert(applied.meta.vip_id, (*key, applied.meta));
            lookup.vips.insert(*key, applied.meta);
            if let TableSource::Maglev(members) = &applied.source
                && let Ok(table) = MaglevTable::build(state.capacity.table_size, members)
            {
                lookup.tables.insert(*key, table);
            }
        }
        for (bkey, entry) in &state.backends {
            if let Some(id) = state.backend_ids.get(bkey) {
                lookup.backends_by_id.insert(id, (*bkey, *entry));
                lookup.backends.insert(*bkey, (id, *entry));
            }
        }
        lookup
    }

    /// The datapath's id of a backend of a VIP, once applied.
    pub fn backend_id(&self, key: &BackendKey) -> Option<BackendId> {
        self.state.backend_ids.get(key)
    }

    /// Whether a VIP is in the datapath with a backend that takes new flows: only such VIPs
    /// may be announced.
    pub fn forwardable(&self, key: &VipKey) -> bool {
        self.state.forwardable(key)
    }

    /// Every applied VIP's traffic accounts, sorted by label.
    pub fn accounts(&self) -> Vec<VipAccount> {
        let mut backends_of: HashMap<VipKey, Vec<(IpAddr, BackendId)>> = HashMap::new();
        for key in self.state.backend_ids.keys() {
            if let Some(id) = self.state.backend_ids.get(key) {
                backends_of.entry(key.0).or_default().push((key.1, id));
            }
        }
        let mut accounts: Vec<VipAccount> = self
            .state
            .vips
            .keys()
            .filter_map(|key| {
                let mut backends = backends_of.remove(key).unwrap_or_default();
                backends.sort();
                Some(VipAccount {
                    name: VipName::of(key)?,
                    retired: self.retired.get(key).copied().unwrap_or_default(),
                    backends,
                })
            })
            .collect();
        accounts.sort_by_key(|a| a.name);
        accounts
    }
}

#[cfg(test)]
mod tests;
