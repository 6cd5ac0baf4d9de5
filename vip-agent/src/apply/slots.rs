//! Which Maglev table slot each VIP uses, and which are free.
//!
//! `MAGLEV` holds a fixed number of table slots. A new table is written whole into a free slot;
//! then the VIP's `VipMeta::table` is pointed at it by one hash map update, which readers see
//! atomically. The VIP's old slot goes to the back of the free queue, so it is rewritten only
//! after every other free slot: packets still reading it (a few microseconds) see it unchanged.

use std::collections::{HashMap, VecDeque};

use vip_common::VipKey;

/// Table slots `0..slots`: live ones by VIP, free ones in reuse order.
#[derive(Clone, Debug)]
pub struct TableSlots {
    free: VecDeque<u32>,
    live: HashMap<VipKey, u32>,
}

impl TableSlots {
    pub fn new(slots: u32) -> Self {
        Self {
            free: (0..slots).collect(),
            live: HashMap::new(),
        }
    }

    /// The next free slot, taken; `None` when every slot is in use.
    pub fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }

    /// Makes `slot` (taken) the VIP's live slot; its previous one is freed, to be reused last.
    pub fn make_live(&mut self, key: VipKey, slot: u32) {
        if let Some(old) = self.live.insert(key, slot) {
            self.free.push_back(old);
        }
    }

    /// Marks `slot` as live for `key` (found in pinned maps at start).
    pub fn adopt(&mut self, key: VipKey, slot: u32) {
        self.free.retain(|&f| f != slot);
        self.live.insert(key, slot);
    }

    /// Frees the VIP's slot.
    pub fn release(&mut self, key: &VipKey) {
        if let Some(slot) = self.live.remove(key) {
            self.free.push_back(slot);
        }
    }
}
