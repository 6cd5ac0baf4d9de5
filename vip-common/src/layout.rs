//! Map names and sizes: the one place both sides take them from.
//!
//! The agent checks every pinned map it reuses against [`LAYOUT`] before handing it to a new
//! program (aya itself does not compare a pinned map with the object), and a test compares
//! [`LAYOUT`] with a freshly loaded object, so the table cannot drift from the program.

use crate::{conntrack::ConntrackBucket, maps::*};

/// Default Maglev table size (prime), as in the Maglev paper.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Default VIP capacity (entries of `VIPS` and `VIP_META`); the agent sizes them
/// at load time (`node.max_vips`).
pub const DEFAULT_MAX_VIPS: u32 = 1024;
/// Default backend capacity, over all VIPs (entries of `BACKENDS` and `BACKEND_STATS`; one per
/// backend of each VIP); the agent sizes them at load time (`node.max_backends`).
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// Upper bound of both capacities: a [`BackendId`](crate::BackendId) must fit the low 16 bits
/// of a health-check mark.
pub const CAPACITY_LIMIT: u32 = 1 << 16;
/// Default number of Maglev table slots in `MAGLEV` (each of `table_size` entries). A VIP uses
/// one live slot; a table switch writes a free one, so this bounds VIPs per node at a given table
/// size. The agent sizes the map with `EbpfLoader::set_max_entries`.
pub const DEFAULT_TABLE_SLOTS: u32 = 16;
/// Default flows each conntrack table (`CT_TABLE_V4`, `CT_TABLE_V6`) holds: 65,536 buckets of
/// [`CONNTRACK_WAYS`](crate::conntrack::CONNTRACK_WAYS).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;

pub const VIPS: &str = "VIPS";
pub const BACKENDS: &str = "BACKENDS";
pub const MAGLEV: &str = "MAGLEV";
/// The conntrack tables, by address family (see [`crate::conntrack`]); entries are buckets.
pub const CT_TABLE_V4: &str = "CT_TABLE_V4";
pub const CT_TABLE_V6: &str = "CT_TABLE_V6";
/// The datapath's global holding log2 of the conntrack tables' buckets, set at load.
pub const CONNTRACK_BUCKET_BITS: &str = "CONNTRACK_BUCKET_BITS";
pub const STATS: &str = "STATS";
pub const BACKEND_STATS: &str = "BACKEND_STATS";
pub const DATAPATH_CONFIG: &str = "DATAPATH_CONFIG";
pub const VIP_FILTER: &str = "VIP_FILTER";
pub const VIP_META: &str = "VIP_META";
/// A counter the agent moves on after every change to `VIP_META`, `BACKENDS` or
/// `DATAPATH_CONFIG`: the datapath replays a flow's recorded outer headers only while it has
/// not moved since they were recorded.
pub const CONFIG_GENERATION: &str = "CONFIG_GENERATION";
/// The devmap of interfaces packets are redirected to (not pinned: the agent fills it as it
/// writes backends' next hops).
pub const TX_PORTS: &str = "TX_PORTS";
/// Entries of `TX_PORTS`: interfaces a node's next hops can use.
pub const MAX_TX_PORTS: u32 = 256;
/// 64-bit words of `VIP_FILTER`.
pub const VIP_FILTER_WORDS: u32 = crate::hash::VIP_FILTER_BITS / 64;

pub const DECAP_LOCAL: &str = "DECAP_LOCAL";
pub const DECAP_VIPS: &str = "DECAP_VIPS";
pub const DECAP_STATS: &str = "DECAP_STATS";
pub const DECAP_CONFIG: &str = "DECAP_CONFIG";
/// Addresses in each of `DECAP_LOCAL` and `DECAP_VIPS`.
pub const MAX_DECAP_ADDRS: u32 = 4096;

/// Name of the backends' decapsulation XDP program in the `vip-decap` object.
pub const DECAP_PROGRAM: &str = "vip_decap";

/// Name of the load-balancer XDP program in the object.
pub const LB_PROGRAM: &str = "vip_lb";
/// The program `vip_lb` tail-calls with datapath logs on, and the (unpinned) program array it
/// is called through.
pub const LB_LOG_PROGRAM: &str = "vip_lb_log";
pub const LOG_PROGRAM: &str = "LOG_PROGRAM";
/// The tc program (egress of `lo`) that sends health-check probes through the data path.
pub const HEALTH_CHECK_PROGRAM: &str = "vip_hc";

/// How a map must look. `max_entries: None` means "set by the agent at load time".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: Option<u32>,
}

const fn layout<K, V>(name: &'static str, max_entries: Option<u32>) -> MapLayout {
    MapLayout {
        name,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        max_entries,
    }
}

/// Every map of the load-balancer program.
pub const LAYOUT: [MapLayout; 11] = [
    layout::<VipKey, VipMeta>(VIPS, None),
    layout::<u32, Backend>(BACKENDS, None),
    layout::<u32, BackendId>(MAGLEV, None),
    layout::<u32, ConntrackBucket<FlowKeyV4>>(CT_TABLE_V4, None),
    layout::<u32, ConntrackBucket<FlowKey>>(CT_TABLE_V6, None),
    layout::<u32, DatapathStats>(STATS, Some(1)),
    layout::<u32, TrafficCounters>(BACKEND_STATS, None),
    layout::<u32, DatapathConfig>(DATAPATH_CONFIG, Some(1)),
    layout::<u32, u64>(VIP_FILTER, Some(VIP_FILTER_WORDS)),
    layout::<u32, VipMeta>(VIP_META, None),
    layout::<u32, u64>(CONFIG_GENERATION, Some(1)),
];

/// Maps that earlier versions pinned and this one no longer has: `vip-agent detach` removes
/// them too. `VIP_STATS` (per-VIP traffic): a VIP's traffic is now its backends'.
/// `CONNTRACK_V4` and `CONNTRACK` (LRU hash maps): the conntrack tables replaced them; a new
/// agent over their pins copies their entries into the tables first.
pub const OBSOLETE_PINS: [&str; 3] = ["VIP_STATS", LEGACY_CONNTRACK_V4, LEGACY_CONNTRACK_V6];

/// The LRU hash maps (keys [`FlowKeyV4`] and [`FlowKey`], values [`ConnEntry`]) that held
/// conntrack before the tables.
pub const LEGACY_CONNTRACK_V4: &str = "CONNTRACK_V4";
pub const LEGACY_CONNTRACK_V6: &str = "CONNTRACK";

/// Every map of the decapsulation program.
pub const DECAP_LAYOUT: [MapLayout; 4] = [
    layout::<AddrKey, u32>(DECAP_LOCAL, Some(MAX_DECAP_ADDRS)),
    layout::<AddrKey, u32>(DECAP_VIPS, Some(MAX_DECAP_ADDRS)),
    layout::<u32, DecapStats>(DECAP_STATS, Some(1)),
    layout::<u32, DecapConfig>(DECAP_CONFIG, Some(1)),
];
