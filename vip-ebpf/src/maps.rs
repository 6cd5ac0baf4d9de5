//! The load balancer's maps. Layouts and sizes come from `vip_common::layout`; the agent writes
//! every map except the counters, which only the datapath writes; the conntrack tables both
//! write.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    btf_maps::{Array, DevMapHash, HashMap, PerCpuArray},
    macros::btf_map,
};
use vip_common::{
    Backend, BackendId, DatapathConfig, DatapathStats, FlowKey, FlowKeyV4, InsertBudget,
    TrafficCounters, VipKey, VipMeta,
    conntrack::{CONNTRACK_WAYS, ConntrackBucket},
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

/// Connection tracking of IPv4 flows: 4-way buckets of flow and backend (see
/// `vip_common::conntrack`), `2^CONNTRACK_BUCKET_BITS` of them (sized by the agent at load).
/// Written by the datapath as flows start, and by the agent (entries shared by peers); the
/// agent reads it through a shared mapping.
#[btf_map]
pub(crate) static CT_TABLE_V4: Array<
    ConntrackBucket<FlowKeyV4>,
    { DEFAULT_CONNTRACK_BUCKETS as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// Connection tracking of IPv6 flows, as `CT_TABLE_V4` with a key of 40 bytes instead of 16.
#[btf_map]
pub(crate) static CT_TABLE_V6: Array<
    ConntrackBucket<FlowKey>,
    { DEFAULT_CONNTRACK_BUCKETS as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// log2 of the buckets in each conntrack table: set by the agent at load (a constant to the
/// verifier), with the tables' size.
#[unsafe(no_mangle)]
static CONNTRACK_BUCKET_BITS: u32 = DEFAULT_CONNTRACK_BUCKETS.trailing_zeros();

/// `CONNTRACK_BUCKET_BITS`, read as the loader left it.
#[inline(always)]
pub(crate) fn conntrack_bucket_bits() -> u32 {
    // SAFETY: a plain read of a global the loader may have rewritten; volatile so the
    // compiler does not fold the default in.
    unsafe { core::ptr::read_volatile(&raw const CONNTRACK_BUCKET_BITS) }
}

const DEFAULT_CONNTRACK_BUCKETS: u32 = DEFAULT_CONNTRACK_ENTRIES / CONNTRACK_WAYS as u32;

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

/// Bumped by the agent after every change it makes to `VIP_META`, `BACKENDS` or
/// `DATAPATH_CONFIG`: a flow's recorded headers (see `replay`) hold only while it has not
/// moved. Pinned, so that a program about to be replaced sees a new agent's changes too.
#[btf_map]
pub(crate) static CONFIG_GENERATION: Array<u64, 1> = Array::new();

/// Node-wide settings. Written by the agent before any VIP.
#[btf_map]
pub(crate) static DATAPATH_CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Interfaces by ifindex, for `bpf_redirect_map`: the kernel takes the device from the entry
/// (no lookup by ifindex per packet) and flushes its queue once per NAPI poll. Written by the
/// agent with each backend's next hop; not pinned (a new program starts empty and redirects by
/// ifindex until the agent has written it).
#[btf_map]
pub(crate) static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();
