//! The writes a plan is made of, as a trait: the datapath implements it with map updates, and
//! host tests with an image of the maps, so plans are checked without root.

use vip_common::{Backend, BackendId, TrafficCounters, VipKey, VipMeta};

use crate::dataplane::{Dataplane, DataplaneError};

/// Writes into the load balancer's maps.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_insert_limit(&mut self, per_second: u32) -> Result<(), Self::Error>;
    fn set_backend(&mut self, id: BackendId, entry: &Backend) -> Result<(), Self::Error>;
    /// Empties backend `id` and zeroes its counters; returns what it had sent.
    fn release_backend(&mut self, id: BackendId) -> Result<TrafficCounters, Self::Error>;
    /// Writes a whole table into table slot `slot`.
    fn write_table(&mut self, slot: u32, table: &[BackendId]) -> Result<(), Self::Error>;
    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), Self::Error>;
    /// Removes a VIP (absent already: nothing to do).
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), Self::Error>;
}

impl MapWriter for Dataplane {
    type Error = DataplaneError;

    fn set_insert_limit(&mut self, per_second: u32) -> Result<(), DataplaneError> {
        self.set_conntrack_insert_limit(per_second)
    }

    fn set_backend(&mut self, id: BackendId, entry: &Backend) -> Result<(), DataplaneError> {
        Dataplane::set_backend(self, id, entry)
    }

    fn release_backend(&mut self, id: BackendId) -> Result<TrafficCounters, DataplaneError> {
        Dataplane::set_backend(self, id, &bytemuck::Zeroable::zeroed())?;
        let sent = self.backend_traffic(id)?;
        self.reset_backend_traffic(id)?;
        Ok(sent)
    }

    fn write_table(&mut self, slot: u32, table: &[BackendId]) -> Result<(), DataplaneError> {
        Dataplane::write_table(self, slot, table)
    }

    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError> {
        Dataplane::set_vip(self, key, meta)
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        Dataplane::remove_vip(self, key)
    }
}
