//! The conntrack tables (`CT_TABLE_V4`, `CT_TABLE_V6`) through shared mappings of their
//! memory: the agent reads and writes a way as the datapath does, with the same code
//! (`vip_common::conntrack`) and the same check word, while the datapath keeps writing. A walk
//! over every flow is a read of memory, not a system call per entry or per batch.

use std::{
    collections::HashMap,
    marker::PhantomData,
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
};

use aya::maps::MapData;
use bytemuck::{Pod, Zeroable as _};
use vip_common::{
    AddrFamily, BackendId, ConnEntry, FlowKey, FlowKeyV4,
    conntrack::{CONNTRACK_WAYS, ConntrackBucket, ConntrackKey, ConntrackWay},
    layout,
};

use super::{
    batch,
    error::{DataplaneError, Result, map_err},
    mmap::Mapping,
};

/// The connection-tracking tables, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub entries_v4: u64,
    pub entries_v6: u64,
    /// Each table's size in flows.
    pub capacity_v4: u32,
    pub capacity_v6: u32,
    /// Entries by the backend id they send to.
    pub by_backend: HashMap<BackendId, u64>,
}

/// One table, mapped whole.
struct Table<K> {
    mapping: Mapping,
    /// Buckets, a power of two.
    count: u32,
    _key: PhantomData<K>,
}

impl<K: ConntrackKey> Table<K>
where
    ConntrackBucket<K>: Pod,
    ConntrackWay<K>: Pod,
{
    /// Maps the `count` buckets of the table behind `map` (a `BPF_F_MMAPABLE` array).
    fn map(map: BorrowedFd<'_>, count: u32, name: &'static str) -> Result<Self> {
        if !count.is_power_of_two() {
            return Err(DataplaneError::ConntrackBuckets { map: name, count });
        }
        let len = count as usize * size_of::<ConntrackBucket<K>>();
        let mapping = Mapping::new(map, 0, len)
            .map_err(|source| DataplaneError::Mmap { map: name, source })?;
        Ok(Self {
            mapping,
            count,
            _key: PhantomData,
        })
    }

    /// Bucket `index` (< `count`); the values are 8-byte multiples from a page boundary, so
    /// each bucket is aligned.
    fn bucket(&self, index: u32) -> *mut ConntrackBucket<K> {
        debug_assert!(index < self.count);
        // SAFETY: `index` < `count`, the buckets mapped.
        unsafe {
            self.mapping
                .as_ptr()
                .cast::<ConntrackBucket<K>>()
                .add(index as usize)
        }
    }

    fn bucket_of(&self, key: &K) -> *mut ConntrackBucket<K> {
        self.bucket(key.bucket(self.count.trailing_zeros()))
    }

    /// A copy of a bucket as it is now (the datapath may be writing it).
    fn read(bucket: *const ConntrackBucket<K>) -> ConntrackBucket<K> {
        // SAFETY: `bucket` points into the mapping; any bit pattern is a bucket.
        unsafe { bucket.read_volatile() }
    }

    fn write(bucket: *mut ConntrackBucket<K>, way: usize, value: ConntrackWay<K>) {
        // SAFETY: as `read`; `way` < `CONNTRACK_WAYS`, from the bucket's own methods.
        unsafe { (&raw mut (*bucket).ways[way]).write_volatile(value) }
    }

    fn get(&self, key: &K) -> Option<ConnEntry> {
        let bucket = Self::read(self.bucket_of(key));
        bucket.position(key).map(|way| bucket.ways[way].entry)
    }

    /// Writes `key`'s entry as the datapath records a new flow: into the way holding the key,
    /// else the bucket's least recently used.
    fn insert(&self, key: &K, entry: &ConnEntry) {
        let bucket = self.bucket_of(key);
        let way = Self::read(bucket).victim(key);
        let mut value = ConntrackWay::zeroed();
        value.fill(key, entry);
        Self::write(bucket, way, value);
    }

    fn remove(&self, key: &K) {
        let bucket = self.bucket_of(key);
        let copy = Self::read(bucket);
        for (i, way) in copy.ways.iter().enumerate() {
            if way.has_key(key) {
                Self::write(bucket, i, ConntrackWay::zeroed());
            }
        }
    }

    /// Every flow in the table with its entry, each once (a flow two CPUs recorded at the same
    /// moment may hold two ways; lookups find the first).
    fn for_each(&self, mut f: impl FnMut(&K, &ConnEntry)) {
        for index in 0..self.count {
            let bucket = Self::read(self.bucket(index));
            for (i, way) in bucket.ways.iter().enumerate() {
                if bucket.position(&way.key) == Some(i) {
                    f(&way.key, &way.entry);
                }
            }
        }
    }

    fn capacity(&self) -> u32 {
        self.count * CONNTRACK_WAYS as u32
    }
}

/// Both tables of a datapath.
pub struct ConntrackTables {
    v4: Table<FlowKeyV4>,
    v6: Table<FlowKey>,
}

impl ConntrackTables {
    /// Maps the tables behind `v4` and `v6`, `buckets` each.
    pub(crate) fn map(v4: BorrowedFd<'_>, v6: BorrowedFd<'_>, buckets: u32) -> Result<Self> {
        Ok(Self {
            v4: Table::map(v4, buckets, layout::CT_TABLE_V4)?,
            v6: Table::map(v6, buckets, layout::CT_TABLE_V6)?,
        })
    }

    /// Maps the tables pinned under `pin_dir`, sized as they were made.
    pub(crate) fn from_pins(pin_dir: &Path) -> Result<Self> {
        let open = |name: &'static str| -> Result<(MapData, u32)> {
            let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
            let buckets = data.info().map_err(map_err(name))?.max_entries();
            Ok((data, buckets))
        };
        let (v4, buckets) = open(layout::CT_TABLE_V4)?;
        let (v6, _) = open(layout::CT_TABLE_V6)?;
        // The mappings outlive the descriptors they were made through.
        Self::map(v4.fd().as_fd(), v6.fd().as_fd(), buckets)
    }

    pub fn get(&self, flow: &FlowKey) -> Option<ConnEntry> {
        if flow.family == AddrFamily::V4 as u8 {
            self.v4.get(&FlowKeyV4::of(flow))
        } else {
            self.v6.get(flow)
        }
    }

    pub fn insert(&self, flow: &FlowKey, entry: &ConnEntry) {
        if flow.family == AddrFamily::V4 as u8 {
            self.v4.insert(&FlowKeyV4::of(flow), entry);
        } else {
            self.v6.insert(flow, entry);
        }
    }

    pub fn remove(&self, flow: &FlowKey) {
        if flow.family == AddrFamily::V4 as u8 {
            self.v4.remove(&FlowKeyV4::of(flow));
        } else {
            self.v6.remove(flow);
        }
    }

    /// Every flow, IPv4 and IPv6, as the tables hold them now.
    pub fn flows(&self) -> Vec<(FlowKey, ConnEntry)> {
        let mut out = Vec::new();
        self.v4
            .for_each(|key, entry| out.push((key.flow(), *entry)));
        self.v6.for_each(|key, entry| out.push((*key, *entry)));
        out
    }

    pub fn census(&self) -> Census {
        let mut census = Census {
            capacity_v4: self.v4.capacity(),
            capacity_v6: self.v6.capacity(),
            ..Census::default()
        };
        self.v4.for_each(|_, entry| {
            census.entries_v4 += 1;
            *census.by_backend.entry(entry.backend).or_default() += 1;
        });
        self.v6.for_each(|_, entry| {
            census.entries_v6 += 1;
            *census.by_backend.entry(entry.backend).or_default() += 1;
        });
        census
    }

    /// Copies the entries of an earlier version's conntrack maps pinned under `pin_dir` (LRU
    /// hash maps, `layout::LEGACY_CONNTRACK_V4` and `_V6`) into the tables, then removes their
    /// pins: an upgrade keeps its flows. Returns how many were copied; a map that cannot be
    /// read keeps its pin, for the next start to try again.
    pub(crate) fn adopt_legacy(&self, pin_dir: &Path) -> Result<usize> {
        Ok(adopt(&self.v4, pin_dir, layout::LEGACY_CONNTRACK_V4)?
            + adopt(&self.v6, pin_dir, layout::LEGACY_CONNTRACK_V6)?)
    }
}

/// Copies the LRU hash map pinned as `name` (if it is) into `table`, and unpins it.
fn adopt<K: ConntrackKey + aya::Pod>(
    table: &Table<K>,
    pin_dir: &Path,
    name: &'static str,
) -> Result<usize>
where
    ConntrackBucket<K>: Pod,
    ConntrackWay<K>: Pod,
{
    let path = pin_dir.join(name);
    if !path.exists() {
        return Ok(0);
    }
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    let entries = batch::read_all::<K, ConnEntry>(&data).map_err(batch::error(name))?;
    for (key, entry) in &entries {
        table.insert(key, entry);
    }
    std::fs::remove_file(&path).map_err(|source| DataplaneError::Unpin { path, source })?;
    Ok(entries.len())
}
