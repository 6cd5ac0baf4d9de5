//! The load balancer's maps. Layouts and sizes come from `vip_common::layout`; the agent writes
//! every map except the conntrack maps and the counters, which only the datapath writes.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU},
    btf_maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use vip_common::{
    Backend, BackendId, ConnEntry, DatapathConfig, DatapathStats, FlowKey, FlowKeyV4, InsertBudget,
    TrafficCounters, VipKey, VipMeta,
    layout::{
        DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_TABLE_SIZE,
        DEFAULT_TABLE_SLOTS, MAX_TX_PORTS, VIP_FILTER_WORDS,
    },
};

/// The services: VIP (address, protocol, port or 0) to how it is forwarded. Written by the agent
/// after the VIP's table and backends are in place. The VIP and backend maps are sized by the
/// agent at load time (`node.max_vips`, `node.max_backends`); the sizes here are the defaults.
#[btf_map]
pub(crate) static VIPS: HashMap<VipKey, VipMeta, { DEFAULT_MAX_VIPS as usize }> = HashMap::new();

/// The VIPs again, by `vip_id`: established flows read their VIP's settings here (an array
/// read) instead of looking it up by key. Written by the agent with `VIPS`; emptied when the VIP
/// goes.
#[btf_map]
pub(crate) static VIP_META: Array<VipMeta, { DEFAULT_MAX_VIPS as usize }> = Array::new();

/// Backends of all VIPs with their resolved next hops, indexed by `BackendId`. Written by the agent.
#[btf_map]
pub(crate) static BACKENDS: Array<Backend, { DEFAULT_MAX_BACKENDS as usize }> = Array::new();

/// Maglev tables, `table_size` entries per table slot. The agent sizes it at load time and writes
/// a whole table into a free slot before pointing a VIP at it. Memory-mappable: the agent writes
/// a table with one copy, not one system call per entry.
#[btf_map]
pub(crate) static MAGLEV: Array<
    BackendId,
    { (DEFAULT_TABLE_SLOTS * DEFAULT_TABLE_SIZE) as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// Connection tracking of IPv6 flows: flow to backend. Written by the datapath; LRU evicts idle
/// flows. The LRU lists are per CPU (`BPF_F_NO_COMMON_LRU`): inserting a new flow takes no lock
/// shared with other CPUs; entries are still visible from every CPU.
#[btf_map]
pub(crate) static CONNTRACK: LruHashMap<
    FlowKey,
    ConnEntry,
    { DEFAULT_CONNTRACK_ENTRIES as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Connection tracking of IPv4 flows, as `CONNTRACK` with a key of 16 bytes instead of 40.
#[btf_map]
pub(crate) static CONNTRACK_V4: LruHashMap<
    FlowKeyV4,
    ConnEntry,
    { DEFAULT_CONNTRACK_ENTRIES as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Conntrack inserts made in the current window, per CPU (see `DatapathConfig`). Not pinned:
/// a new program starts counting afresh.
#[btf_map]
pub(crate) static INSERT_BUDGET: PerCpuArray<InsertBudget, 1> = PerCpuArray::new();

/// What happened to packets, per CPU.
#[btf_map]
pub(crate) static STATS: PerCpuArray<DatapathStats, 1> = PerCpuArray::new();

/// Traffic per backend (`BackendId`: one per backend of each VIP), per CPU. The only traffic
/// counter a packet updates: the agent sums a VIP's from its backends'.
#[btf_map]
pub(crate) static BACKEND_STATS: PerCpuArray<TrafficCounters, { DEFAULT_MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// Bitmap over `vip_filter_bit(destination)`: a clear bit means "no VIP has this address", and
/// the packet passes after one array read instead of hash lookups. The agent sets a VIP's bit
/// before adding the VIP and clears it after the last VIP on that bit is gone.
#[btf_map]
pub(crate) static VIP_FILTER: Array<u64, { VIP_FILTER_WORDS as usize }> = Array::new();

/// Node-wide settings. Written by the agent before any VIP.
#[btf_map]
pub(crate) static DATAPATH_CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Interfaces by ifindex, for `bpf_redirect_map`: the kernel takes the device from the entry
/// (no lookup by ifindex per packet) and flushes its queue once per NAPI poll. Written by the
/// agent with each backend's next hop; not pinned (a new program starts empty and redirects by
/// ifindex until the agent has written it).
#[btf_map]
pub(crate) static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();
