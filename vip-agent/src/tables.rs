//! Switching a VIP's Maglev table without any packet seeing a half-written one.
//!
//! `MAGLEV` holds a fixed number of table slots. A new table is written whole into a free slot;
//! then the VIP's `VipMeta::table` is pointed at it by one hash map update, which readers see
//! atomically. The VIP's old slot goes to the back of the free queue, so it is rewritten only
//! after every other free slot: packets still reading it (a few microseconds) see it unchanged.

use std::collections::{HashMap, VecDeque};

use vip_common::{VipKey, VipMeta, maglev::MaglevTable};

use crate::dataplane::{Dataplane, DataplaneError};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "all {0} Maglev table slots are in use: raise the table slot count or lower the table size"
    )]
    NoFreeSlot(u32),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// Which table slot each VIP uses, and which are free.
#[derive(Debug)]
pub struct TableSlots {
    slots: u32,
    free: VecDeque<u32>,
    live: HashMap<VipKey, u32>,
}

impl TableSlots {
    pub fn new(slots: u32) -> Self {
        Self {
            slots,
            free: (0..slots).collect(),
            live: HashMap::new(),
        }
    }

    /// Publishes `key` with `meta` and `table`: writes the table into a free slot, then points
    /// the VIP at it. On error nothing the datapath reads has changed.
    pub fn publish(
        &mut self,
        dataplane: &mut Dataplane,
        key: VipKey,
        mut meta: VipMeta,
        table: &MaglevTable,
    ) -> Result<(), TableError> {
        let slot = self
            .free
            .pop_front()
            .ok_or(TableError::NoFreeSlot(self.slots))?;
        meta.table = slot;
        let written = dataplane
            .write_table(slot, table)
            .and_then(|()| dataplane.set_vip(&key, &meta));
        if let Err(e) = written {
            self.free.push_front(slot);
            return Err(e.into());
        }
        if let Some(old) = self.live.insert(key, slot) {
            self.free.push_back(old);
        }
        Ok(())
    }

    /// Marks `slot` as live for `key` (found in pinned maps at start).
    pub fn adopt(&mut self, key: VipKey, slot: u32) {
        self.free.retain(|&f| f != slot);
        self.live.insert(key, slot);
    }

    /// Removes the VIP from the datapath and frees its slot.
    pub fn remove(&mut self, dataplane: &mut Dataplane, key: &VipKey) -> Result<(), TableError> {
        dataplane.remove_vip(key)?;
        if let Some(slot) = self.live.remove(key) {
            self.free.push_back(slot);
        }
        Ok(())
    }

    /// The slot a VIP uses now.
    pub fn slot_of(&self, key: &VipKey) -> Option<u32> {
        self.live.get(key).copied()
    }
}
