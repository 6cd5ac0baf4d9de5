//! The plan of a change: every map write that takes the datapath from what is applied to the
//! target, in the order that keeps packets safe and needs the least room, computed without
//! touching the maps. Ids and table slots are allocated on a copy of the allocators in the same
//! order as the writes, so a change that would run out of either at any moment of the transition
//! fails here, before anything is written.
//!
//! The order:
//! 1. VIPs that leave go first (their table slots and ids are freed), then their backends.
//! 2. Each VIP of the target in turn, then each egress address (whose table is the owner of each
//!    port block): its backends that take traffic are written, then its table (whole, into a
//!    free slot) and the flip of its `VipMeta` to that slot, then the entries of its backends
//!    that went down (after the flip, so the live table never names an emptied entry), and last
//!    the backends that left it.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use vip_common::{
    Backend, BackendId, NO_BACKEND, VipKey, VipMeta,
    maglev::{MaglevBackend, MaglevError, MaglevTable},
};

use super::{
    encode::{backend_entry, datapath_keys, egress_key, egress_meta, vip_meta},
    state::{AppliedVip, State, TableSource},
    target::{BackendKey, BackendTarget, Target},
};
use crate::net::nexthop::NextHop;

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// `DATAPATH_CONFIG`: new conntrack entries per second and CPU.
    SetInsertLimit(u32),
    /// A `BACKENDS` entry.
    SetBackend { id: BackendId, entry: Backend },
    /// A backend id no longer used: its entry and counters zeroed (what it sent stays with
    /// `vip`'s traffic while that VIP stays).
    ReleaseBackend { id: BackendId, vip: VipKey },
    /// A whole table (Maglev, or an egress address's owners) into a free slot.
    WriteTable { slot: u32, table: Vec<BackendId> },
    /// A VIP's `VipMeta` (a new slot, or other settings), in one atomic update.
    SetVip { key: VipKey, meta: VipMeta },
    /// A VIP out of the datapath.
    RemoveVip { key: VipKey },
}

/// Why a change cannot be applied; nothing was written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("VIP {vip}")]
    Maglev {
        vip: String,
        #[source]
        source: MaglevError,
    },
    #[error(
        "all {0} Maglev table slots are in use during the change: raise node.table_slots or \
         lower node.table_size (needs a restart after `vip-agent detach`)"
    )]
    NoFreeSlot(u32),
    #[error("all {0} VIP ids are in use during the change: raise node.max_vips")]
    VipIdsExhausted(u32),
    #[error(
        "all {0} backend ids are in use during the change (each backend of each VIP takes one, \
         old and new ones at once while a VIP switches): raise node.max_backends"
    )]
    BackendIdsExhausted(u32),
}

/// The writes of a change, and what is applied once they are done.
#[derive(Debug)]
pub struct Plan {
    pub(crate) steps: Vec<Step>,
    pub(crate) next: State,
}

impl Plan {
    /// Whether a VIP will be forwardable once the plan is written.
    pub fn forwardable(&self, key: &VipKey) -> bool {
        self.next.forwardable(key)
    }
}

/// Plans the change from `current` to `target`.
pub(crate) fn plan(
    current: &State,
    target: &Target,
    next_hops: &HashMap<IpAddr, NextHop>,
) -> Result<Plan, PlanError> {
    let mut next = current.clone();
    let mut steps = Vec::new();
    if next.insert_limit != Some(target.insert_limit) {
        steps.push(Step::SetInsertLimit(target.insert_limit));
        next.insert_limit = Some(target.insert_limit);
    }
    let wanted: HashSet<VipKey> = target.vips.iter().map(|v| v.config.key()).collect();
    let mut backends_of: HashMap<VipKey, Vec<IpAddr>> = HashMap::new();
    for (vip, addr) in next.backend_ids.keys() {
        backends_of.entry(*vip).or_default().push(*addr);
    }

    // 1. What leaves, first: it frees room for what comes.
    let mut leaving: Vec<VipKey> = next
        .vip_ids
        .keys()
        .filter(|k| !wanted.contains(*k))
        .copied()
        .collect();
    leaving.sort_by_key(|k| bytemuck::bytes_of(k).to_vec());
    for key in leaving {
        for key in datapath_keys(&key) {
            steps.push(Step::RemoveVip { key });
        }
        next.slots.release(&key);
        next.vip_ids.release(&key);
        next.vips.remove(&key);
        for addr in backends_of.remove(&key).unwrap_or_default() {
            release_backend(&mut next, &mut steps, (key, addr));
        }
    }

    // 2. Each VIP of the target, then each egress address.
    for vip in &target.vips {
        let unit = Unit {
            key: vip.config.key(),
            name: vip.config.to_string(),
            backends: vip.backends.clone(),
            table: UnitTable::Maglev,
            meta: &|vip_id, slot| vip_meta(&vip.config, target.sources, vip_id, slot),
        };
        place(&mut next, &mut steps, unit, next_hops, &mut backends_of)?;
    }
    for egress in &target.egress {
        let unit = Unit {
            key: egress_key(egress.config.vip),
            name: format!("egress {}", egress.config.vip),
            // An owner's entry stays while it is configured, its block resting or not.
            backends: egress
                .config
                .backends
                .iter()
                .map(|b| BackendTarget {
                    address: b.address,
                    weight: 1,
                    present: true,
                })
                .collect(),
            table: UnitTable::Owners(&egress.owners),
            meta: &|vip_id, slot| {
                egress_meta(&egress.vip, &egress.config, target.sources, vip_id, slot)
            },
        };
        place(&mut next, &mut steps, unit, next_hops, &mut backends_of)?;
    }
    Ok(Plan { steps, next })
}

/// What a planned key's table is.
enum UnitTable<'a> {
    /// A VIP's Maglev table over its backends' weights.
    Maglev,
    /// An egress address's owner table: the backend of each block (`None`: no owner now).
    Owners(&'a [Option<IpAddr>]),
}

/// One planned key: a VIP or an egress address, with its backends and table.
struct Unit<'a> {
    key: VipKey,
    /// How errors name it.
    name: String,
    backends: Vec<BackendTarget>,
    table: UnitTable<'a>,
    /// Its `VipMeta` for an id and a table slot.
    meta: &'a dyn Fn(u32, u32) -> VipMeta,
}

/// Plans one key: its backends that take traffic are written, then its table (whole, into a
/// free slot) and the flip of its `VipMeta` to that slot, then the entries of its backends that
/// went down, and last the backends that left it.
fn place(
    next: &mut State,
    steps: &mut Vec<Step>,
    unit: Unit,
    next_hops: &HashMap<IpAddr, NextHop>,
    backends_of: &mut HashMap<VipKey, Vec<IpAddr>>,
) -> Result<(), PlanError> {
    let key = unit.key;
    let vip_id = next
        .vip_ids
        .get_or_assign(&key)
        .ok_or(PlanError::VipIdsExhausted(next.capacity.vips))?;
    let mut members = Vec::with_capacity(unit.backends.len());
    let mut after_flip = Vec::new();
    for b in &unit.backends {
        let bkey = (key, b.address);
        let id = next
            .backend_ids
            .get_or_assign(&bkey)
            .ok_or(PlanError::BackendIdsExhausted(next.capacity.backends))?;
        let entry = backend_entry(
            &key,
            b.address,
            vip_id,
            b.present,
            next_hops.get(&b.address),
        );
        if next.backends.get(&bkey) != Some(&entry) {
            let step = Step::SetBackend { id, entry };
            if b.present {
                steps.push(step);
            } else {
                after_flip.push(step);
            }
            next.backends.insert(bkey, entry);
        }
        members.push(MaglevBackend {
            addr: b.address,
            weight: b.weight,
            id,
        });
    }
    let source = match unit.table {
        UnitTable::Maglev => TableSource::Maglev(members),
        UnitTable::Owners(owners) => TableSource::Owners(
            owners
                .iter()
                .map(|owner| {
                    owner
                        .and_then(|addr| members.iter().find(|m| m.addr == addr))
                        .map_or(NO_BACKEND, |m| m.id)
                })
                .collect(),
        ),
    };
    match next.vips.get_mut(&key) {
        Some(applied) if applied.source == source => {
            let meta = (unit.meta)(vip_id, applied.meta.table);
            if applied.meta != meta {
                set_vip(steps, &key, &meta);
                applied.meta = meta;
            }
        }
        _ => {
            let table = match &source {
                TableSource::Maglev(members) => {
                    MaglevTable::build(next.capacity.table_size, members)
                        .map_err(|source| PlanError::Maglev {
                            vip: unit.name.clone(),
                            source,
                        })?
                        .slots()
                        .to_vec()
                }
                TableSource::Owners(owners) => {
                    let mut table = owners.clone();
                    table.resize(next.capacity.table_size as usize, NO_BACKEND);
                    table
                }
            };
            let slot = next
                .slots
                .take()
                .ok_or(PlanError::NoFreeSlot(next.capacity.table_slots))?;
            let meta = (unit.meta)(vip_id, slot);
            steps.push(Step::WriteTable { slot, table });
            set_vip(steps, &key, &meta);
            next.slots.make_live(key, slot);
            next.vips.insert(key, AppliedVip { meta, source });
        }
    }
    steps.append(&mut after_flip);
    let kept: HashSet<IpAddr> = unit.backends.iter().map(|b| b.address).collect();
    for addr in backends_of.remove(&key).unwrap_or_default() {
        if !kept.contains(&addr) {
            release_backend(next, steps, (key, addr));
        }
    }
    Ok(())
}

/// The writes of a key's `VipMeta`: one per datapath key it stands for.
fn set_vip(steps: &mut Vec<Step>, key: &VipKey, meta: &VipMeta) {
    for key in datapath_keys(key) {
        let meta = VipMeta { vip: key, ..*meta };
        steps.push(Step::SetVip { key, meta });
    }
}

fn release_backend(next: &mut State, steps: &mut Vec<Step>, key: BackendKey) {
    if let Some(id) = next.backend_ids.release(&key) {
        steps.push(Step::ReleaseBackend { id, vip: key.0 });
    }
    next.backends.remove(&key);
}
