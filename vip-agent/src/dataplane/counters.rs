//! Read-only handles on a pinned datapath's counters, opened beside the runtime's own handles
//! so that a metrics scrape never waits for the runtime.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use vip_common::{BackendId, DatapathStats, DecapStats, TrafficCounters, layout};

use super::{
    conntrack::{Census, ConntrackTables},
    error::{DataplaneError, Result, map_err},
};

/// Sums per-CPU values of a struct of `u64` counters.
pub(crate) fn sum_cpus<T: aya::Pod + bytemuck::Pod>(values: &PerCpuValues<T>) -> T {
    let mut sum: T = bytemuck::Zeroable::zeroed();
    for cpu in values.iter() {
        let words: &[u64] = bytemuck::cast_slice(bytemuck::bytes_of(cpu));
        let total: &mut [u64] = bytemuck::cast_slice_mut(bytemuck::bytes_of_mut(&mut sum));
        for (s, w) in total.iter_mut().zip(words) {
            *s += w;
        }
    }
    sum
}

/// Sums entry `index` of the per-CPU array `map` over CPUs.
pub(crate) fn sum_entry<T: aya::Pod + bytemuck::Pod>(
    map: &PerCpuArray<impl std::borrow::Borrow<MapData>, T>,
    name: &'static str,
    index: u32,
) -> Result<T> {
    Ok(sum_cpus(&map.get(&index, 0).map_err(map_err(name))?))
}

fn open<T: aya::Pod>(pin_dir: &Path, name: &'static str) -> Result<PerCpuArray<MapData, T>> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(name))
}

/// The counters of the node's datapath.
pub enum Counters {
    Lb {
        stats: PerCpuArray<MapData, DatapathStats>,
        backends: PerCpuArray<MapData, TrafficCounters>,
        conntrack: Box<ConntrackTables>,
    },
    Decap {
        stats: PerCpuArray<MapData, DecapStats>,
    },
}

impl Counters {
    /// The load balancer's counters pinned under `pin_dir`.
    pub fn open_lb(pin_dir: &Path) -> Result<Self> {
        Ok(Counters::Lb {
            stats: open(pin_dir, layout::STATS)?,
            backends: open(pin_dir, layout::BACKEND_STATS)?,
            conntrack: Box::new(ConntrackTables::from_pins(pin_dir)?),
        })
    }

    /// The decapsulation program's counters pinned under `pin_dir`.
    pub fn open_decap(pin_dir: &Path) -> Result<Self> {
        Ok(Counters::Decap {
            stats: open(pin_dir, layout::DECAP_STATS)?,
        })
    }

    /// The load balancer's outcome counters.
    pub fn datapath(&self) -> Option<DatapathStats> {
        match self {
            Counters::Lb { stats, .. } => sum_entry(stats, layout::STATS, 0).ok(),
            Counters::Decap { .. } => None,
        }
    }

    /// The decapsulation program's outcome counters.
    pub fn decap(&self) -> Option<DecapStats> {
        match self {
            Counters::Decap { stats } => sum_entry(stats, layout::DECAP_STATS, 0).ok(),
            Counters::Lb { .. } => None,
        }
    }

    /// Counts the connection-tracking entries (a read of both tables, tens of MiB at large
    /// sizes: callers should not ask more often than every few seconds).
    pub fn conntrack_census(&self) -> Option<Census> {
        match self {
            Counters::Lb { conntrack, .. } => Some(conntrack.census()),
            Counters::Decap { .. } => None,
        }
    }

    /// Traffic sent to backend `id`.
    pub fn backend_traffic(&self, id: BackendId) -> Result<TrafficCounters> {
        match self {
            Counters::Lb { backends, .. } => sum_entry(backends, layout::BACKEND_STATS, id),
            Counters::Decap { .. } => Err(DataplaneError::MissingMap(layout::BACKEND_STATS)),
        }
    }
}
