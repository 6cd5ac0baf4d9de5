//! What the maps hold, as the agent wrote them: ids, table slots, VIP and backend entries.

use std::collections::HashMap;

use vip_common::{Backend, BackendId, VipKey, VipMeta, maglev::MaglevBackend};

use super::{ids::Ids, slots::TableSlots, target::BackendKey};

/// The datapath's fixed sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub table_size: u32,
    pub table_slots: u32,
    pub vips: u32,
    pub backends: u32,
}

impl From<&crate::dataplane::DataplaneOptions> for Capacity {
    fn from(o: &crate::dataplane::DataplaneOptions) -> Self {
        Capacity {
            table_size: o.table_size,
            table_slots: o.table_slots,
            vips: o.max_vips,
            backends: o.max_backends,
        }
    }
}

/// A VIP (or egress address) as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AppliedVip {
    pub(crate) meta: VipMeta,
    /// What its live table was made from: an equal source means an equal table.
    pub(crate) source: TableSource,
}

/// What a table is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TableSource {
    /// A VIP's Maglev table: its members as built.
    Maglev(Vec<MaglevBackend>),
    /// An egress address's owner of each block.
    Owners(Vec<BackendId>),
}

/// What the maps hold, as far as the agent wrote them.
#[derive(Clone, Debug)]
pub(crate) struct State {
    pub(super) capacity: Capacity,
    pub(super) slots: TableSlots,
    pub(super) vip_ids: Ids<VipKey>,
    pub(super) backend_ids: Ids<BackendKey>,
    pub(super) vips: HashMap<VipKey, AppliedVip>,
    pub(super) backends: HashMap<BackendKey, Backend>,
    pub(super) insert_limit: Option<u32>,
}

impl State {
    /// Nothing written yet.
    pub(super) fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            slots: TableSlots::new(capacity.table_slots),
            vip_ids: Ids::new(capacity.vips),
            backend_ids: Ids::new(capacity.backends),
            vips: HashMap::new(),
            backends: HashMap::new(),
            insert_limit: None,
        }
    }

    pub(super) fn forwardable(&self, key: &VipKey) -> bool {
        self.vips.get(key).is_some_and(|v| match &v.source {
            TableSource::Maglev(members) => members.iter().any(|m| m.weight > 0),
            TableSource::Owners(_) => false,
        })
    }
}
