//! The plan of a change: every map write that takes the datapath from what is applied to the
//! target, in the order that keeps packets safe and needs the least room, computed without
//! touching the maps. Ids and table slots are allocated on a copy of the allocators in the same
//! order as the writes, so a change that would run out of either at any moment of the transition
//! fails here, before anything is written.
//!
//! The order:
//! 1. VIPs that leave go first (their table slots and ids are freed), then their backends.
//! 2. Each VIP of the target in turn: its backends that take traffic are written, then its table
//!    (whole, into a free slot) and the flip of its `VipMeta` to that slot, then the entries of
//!    its backends that went down (after the flip, so the live table never names an emptied
//!    entry), and last the backends that left it.

use std::collections::{HashMap, HashSet};

use vip_common::{
    Backend, BackendId, VipKey, VipMeta,
    maglev::{MaglevBackend, MaglevError, MaglevTable},
};

use super::{
    encode::{backend_entry, vip_meta},
    state::{AppliedVip, State},
    target::{BackendKey, Target},
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
    /// A whole Maglev table into a free slot.
    WriteTable { slot: u32, table: MaglevTable },
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
    next_hops: &HashMap<std::net::IpAddr, NextHop>,
) -> Result<Plan, PlanError> {
    let mut next = current.clone();
    let mut steps = Vec::new();
    if next.insert_limit != Some(target.insert_limit) {
        steps.push(Step::SetInsertLimit(target.insert_limit));
        next.insert_limit = Some(target.insert_limit);
    }
    let wanted: HashSet<VipKey> = target.vips.iter().map(|v| v.config.key()).collect();
    let mut backends_of: HashMap<VipKey, Vec<std::net::IpAddr>> = HashMap::new();
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
        steps.push(Step::RemoveVip { key });
        next.slots.release(&key);
        next.vip_ids.release(&key);
        next.vips.remove(&key);
        for addr in backends_of.remove(&key).unwrap_or_default() {
            release_backend(&mut next, &mut steps, (key, addr));
        }
    }

    // 2. Each VIP of the target.
    for vip in &target.vips {
        let key = vip.config.key();
        let vip_id = next
            .vip_ids
            .get_or_assign(&key)
            .ok_or(PlanError::VipIdsExhausted(next.capacity.vips))?;
        let mut members = Vec::with_capacity(vip.backends.len());
        let mut after_flip = Vec::new();
        for b in &vip.backends {
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
        match next.vips.get_mut(&key) {
            Some(applied) if applied.members == members => {
                let meta = vip_meta(&vip.config, target.sources, vip_id, applied.meta.table);
                if applied.meta != meta {
                    steps.push(Step::SetVip { key, meta });
                    applied.meta = meta;
                }
            }
            _ => {
                let table =
                    MaglevTable::build(next.capacity.table_size, &members).map_err(|source| {
                        PlanError::Maglev {
                            vip: vip.config.to_string(),
                            source,
                        }
                    })?;
                let slot = next
                    .slots
                    .take()
                    .ok_or(PlanError::NoFreeSlot(next.capacity.table_slots))?;
                let meta = vip_meta(&vip.config, target.sources, vip_id, slot);
                steps.push(Step::WriteTable { slot, table });
                steps.push(Step::SetVip { key, meta });
                next.slots.make_live(key, slot);
                next.vips.insert(key, AppliedVip { meta, members });
            }
        }
        steps.append(&mut after_flip);
        let kept: HashSet<std::net::IpAddr> = vip.backends.iter().map(|b| b.address).collect();
        for addr in backends_of.remove(&key).unwrap_or_default() {
            if !kept.contains(&addr) {
                release_backend(&mut next, &mut steps, (key, addr));
            }
        }
    }
    Ok(Plan { steps, next })
}

fn release_backend(next: &mut State, steps: &mut Vec<Step>, key: BackendKey) {
    if let Some(id) = next.backend_ids.release(&key) {
        steps.push(Step::ReleaseBackend { id, vip: key.0 });
    }
    next.backends.remove(&key);
}
