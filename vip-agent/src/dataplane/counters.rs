//! Read-only handles on a pinned datapath's counters, opened beside the runtime's own handles
//! so that a metrics scrape never waits for the runtime.

use std::path::Path;

use aya::maps::{HashMap as AyaHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use vip_common::{
    BackendId, ConnEntry, DatapathStats, DecapStats, FlowKey, FlowKeyV4, TrafficCounters, layout,
};

use super::error::{DataplaneError, Result, map_err};

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

/// A pinned LRU hash map, and its size.
fn open_lru<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<(AyaHashMap<MapData, K, V>, u32)> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    let capacity = data.info().map_err(map_err(name))?.max_entries();
    let map = AyaHashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))?;
    Ok((map, capacity))
}

fn open<T: aya::Pod>(pin_dir: &Path, name: &'static str) -> Result<PerCpuArray<MapData, T>> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(name))
}

/// The connection-tracking maps, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub entries_v4: u64,
    pub entries_v6: u64,
    /// Each map's size.
    pub capacity_v4: u32,
    pub capacity_v6: u32,
    /// Entries by the backend id they send to.
    pub by_backend: std::collections::HashMap<BackendId, u64>,
}

/// The connection-tracking maps, for counting.
pub struct Conntrack {
    v4: AyaHashMap<MapData, FlowKeyV4, ConnEntry>,
    v6: AyaHashMap<MapData, FlowKey, ConnEntry>,
    /// Sizes of the IPv4 and IPv6 maps.
    capacity: (u32, u32),
}

/// The counters of the node's datapath.
pub enum Counters {
    Lb {
        stats: PerCpuArray<MapData, DatapathStats>,
        backends: PerCpuArray<MapData, TrafficCounters>,
        conntrack: Box<Conntrack>,
    },
    Decap {
        stats: PerCpuArray<MapData, DecapStats>,
    },
}

impl Counters {
    /// The load balancer's counters pinned under `pin_dir`.
    pub fn open_lb(pin_dir: &Path) -> Result<Self> {
        let (conntrack_v4, capacity_v4) = open_lru(pin_dir, layout::CONNTRACK_V4)?;
        let (conntrack_v6, capacity_v6) = open_lru(pin_dir, layout::CONNTRACK)?;
        Ok(Counters::Lb {
            stats: open(pin_dir, layout::STATS)?,
            backends: open(pin_dir, layout::BACKEND_STATS)?,
            conntrack: Box::new(Conntrack {
                v4: conntrack_v4,
                v6: conntrack_v6,
                capacity: (capacity_v4, capacity_v6),
            }),
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

    /// Counts the connection-tracking entries (a walk over both maps: a syscall per entry, so
    /// callers should not ask more often than every few seconds).
    pub fn conntrack_census(&self) -> Option<Census> {
        let Counters::Lb { conntrack, .. } = self else {
            return None;
        };
        let mut census = Census {
            capacity_v4: conntrack.capacity.0,
            capacity_v6: conntrack.capacity.1,
            ..Census::default()
        };
        // Entries evicted during the walk show up as errors: skip them.
        for (_, entry) in conntrack.v4.iter().filter_map(|e| e.ok()) {
            census.entries_v4 += 1;
            *census.by_backend.entry(entry.backend).or_default() += 1;
        }
        for (_, entry) in conntrack.v6.iter().filter_map(|e| e.ok()) {
            census.entries_v6 += 1;
            *census.by_backend.entry(entry.backend).or_default() += 1;
        }
        Some(census)
    }

    /// Traffic sent to backend `id`.
    pub fn backend_traffic(&self, id: BackendId) -> Result<TrafficCounters> {
        match self {
            Counters::Lb { backends, .. } => sum_entry(backends, layout::BACKEND_STATS, id),
            Counters::Decap { .. } => Err(DataplaneError::MissingMap(layout::BACKEND_STATS)),
        }
    }
}
