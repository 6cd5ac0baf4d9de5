//! Loading the load-balancer program and writing its maps.
//!
//! This is the only code that touches the datapath's maps; the agent, the tests and the benchmark
//! all go through it. Map layouts come from `vip_common::layout`.

mod attach;
mod batch;
mod conntrack;
mod counters;
pub mod decap;
mod error;
pub mod log;
mod mmap;
pub mod object;
mod pins;
pub mod test_run;

pub use attach::{attach_xdp_pinned, detach_all, link_pin_path};
pub(crate) use attach::{load_retrying, xdp_program};
pub use conntrack::{Census, ConntrackTables};
pub use counters::Counters;
pub use decap::DecapPlane;
pub(crate) use pins::{check_pinned, create_pin_dir};

use std::{
    collections::BTreeSet,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues,
        ProgramArray,
    },
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use vip_common::{
    BACKEND_F_NEXTHOP, Backend, BackendId, ConnEntry, DatapathConfig, DatapathStats, FlowKey,
    INSERT_WINDOW_SHIFT, TrafficCounters, VipKey, VipMeta,
    conntrack::{CONNTRACK_WAYS, bucket_bits},
    hash::vip_filter_bit,
    layout::{
        self, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS,
        DEFAULT_TABLE_SIZE, DEFAULT_TABLE_SLOTS, LAYOUT,
    },
    maglev::is_prime,
};

use counters::sum_entry;
pub use error::DataplaneError;
pub(crate) use error::{Result, map_err};
use log::{DatapathLog, ToTracing};

/// aya-log's level global in the eBPF object.
const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";

/// Sizes fixed when the program is loaded.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// Maglev table size M (prime).
    pub table_size: u32,
    /// Maglev table slots in `MAGLEV` (VIPs plus spares for switching tables).
    pub table_slots: u32,
    /// Flows each conntrack table holds (`CT_TABLE_V4` for IPv4 flows, `CT_TABLE_V6` for
    /// IPv6), rounded up to a power of two of buckets.
    pub conntrack_entries: u32,
    /// VIP capacity: entries of `VIPS`, `VIP_META`.
    pub max_vips: u32,
    /// Backend capacity (one per backend of each VIP): entries of `BACKENDS`, `BACKEND_STATS`.
    pub max_backends: u32,
    /// Pin (and reuse pinned) maps in this bpffs directory; `None` keeps maps private to this load.
    pub pin_dir: Option<PathBuf>,
    /// Datapath debug logs ([`Dataplane::start_log`]); off, the log path is pruned at load.
    pub datapath_log: bool,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            table_size: DEFAULT_TABLE_SIZE,
            table_slots: DEFAULT_TABLE_SLOTS,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            max_vips: DEFAULT_MAX_VIPS,
            max_backends: DEFAULT_MAX_BACKENDS,
            pin_dir: None,
            datapath_log: false,
        }
    }
}

impl DataplaneOptions {
    /// The options a datapath pinned under `pin_dir` was loaded with, read from its maps: for
    /// tools that open a running datapath without its config.
    pub fn from_pins(pin_dir: &Path) -> Result<Self> {
        let info =
            |name: &'static str| MapInfo::from_pin(pin_dir.join(name)).map_err(map_err(name));
        let config_map = MapData::from_pin(pin_dir.join(layout::DATAPATH_CONFIG))
            .map_err(map_err(layout::DATAPATH_CONFIG))?;
        let config: Array<MapData, DatapathConfig> =
            Array::try_from(aya::maps::Map::Array(config_map))
                .map_err(map_err(layout::DATAPATH_CONFIG))?;
        let table_size = config
            .get(&0, 0)
            .map_err(map_err(layout::DATAPATH_CONFIG))?
            .table_size;
        if table_size == 0 {
            return Err(DataplaneError::TableSizeNotPrime(0));
        }
        Ok(Self {
            table_size,
            table_slots: info(layout::MAGLEV)?.max_entries() / table_size,
            conntrack_entries: info(layout::CT_TABLE_V4)?.max_entries() * CONNTRACK_WAYS as u32,
            max_vips: info(layout::VIPS)?.max_entries(),
            max_backends: info(layout::BACKENDS)?.max_entries(),
            pin_dir: Some(pin_dir.to_owned()),
            datapath_log: false,
        })
    }

    /// Buckets of each conntrack table.
    fn conntrack_buckets(&self) -> u32 {
        1 << bucket_bits(self.conntrack_entries)
    }

    /// Entries each map must have with these options.
    fn max_entries(&self, name: &str) -> Option<u32> {
        match name {
            layout::MAGLEV => Some(self.table_size * self.table_slots),
            layout::CT_TABLE_V4 | layout::CT_TABLE_V6 => Some(self.conntrack_buckets()),
            layout::VIPS | layout::VIP_META => Some(self.max_vips),
            layout::BACKENDS | layout::BACKEND_STATS => Some(self.max_backends),
            _ => LAYOUT.iter().find(|l| l.name == name)?.max_entries,
        }
    }
}

/// The loaded load-balancer program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    options: DataplaneOptions,
    /// `vip_hc` is attached to `lo` (for as long as this lives).
    health_check_program: bool,
    /// Interfaces written into `TX_PORTS` by this load, so that each is written once rather
    /// than with every backend write.
    tx_ports: BTreeSet<u32>,
    /// The conntrack tables, mapped; `None` for an object without them (an earlier version's,
    /// loaded by `vip-bench --compare`).
    conntrack: Option<ConntrackTables>,
}

impl Dataplane {
    /// Loads the embedded load-balancer object (not yet attached) and writes its node config.
    pub fn load(options: DataplaneOptions) -> Result<Self> {
        let object = if options.datapath_log {
            object::load_balancer_with_log()
        } else {
            object::load_balancer()
        };
        Self::load_object(object, options)
    }

    /// Loads a given object; for tests that need a second, independent copy.
    pub fn load_object(object: &[u8], options: DataplaneOptions) -> Result<Self> {
        if !is_prime(options.table_size) {
            return Err(DataplaneError::TableSizeNotPrime(options.table_size));
        }
        let mut loader = EbpfLoader::new();
        // aya-log's level: Debug turns the log path on, 0 lets the verifier prune it.
        let log_level = if options.datapath_log {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        loader.override_global(AYA_LOG_LEVEL, &log_level, true);
        let bits = bucket_bits(options.conntrack_entries);
        loader.override_global(layout::CONNTRACK_BUCKET_BITS, &bits, false);
        let pins: Vec<(&'static str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                create_pin_dir(dir)?;
                LAYOUT.iter().map(|l| (l.name, dir.join(l.name))).collect()
            }
            None => Vec::new(),
        };
        for l in LAYOUT.iter() {
            if let Some(entries) = options.max_entries(l.name) {
                loader.map_max_entries(l.name, entries);
            }
        }
        for (name, path) in &pins {
            if path.exists() {
                check_pinned(path, name, &LAYOUT, options.max_entries(name))?;
            }
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(object).map_err(DataplaneError::Load)?;
        let conntrack = match (ebpf.map(layout::CT_TABLE_V4), ebpf.map(layout::CT_TABLE_V6)) {
            (Some(aya::maps::Map::Array(v4)), Some(aya::maps::Map::Array(v6))) => {
                Some(ConntrackTables::map(
                    v4.fd().as_fd(),
                    v6.fd().as_fd(),
                    options.conntrack_buckets(),
                )?)
            }
            _ => None,
        };
        if let (Some(tables), Some(dir)) = (&conntrack, &options.pin_dir) {
            let adopted = tables.adopt_legacy(dir)?;
            if adopted > 0 {
                tracing::info!(
                    flows = adopted,
                    "conntrack entries of the earlier version's maps copied into the tables"
                );
            }
        }
        let mut dataplane = Self {
            ebpf,
            options,
            health_check_program: false,
            tx_ports: BTreeSet::new(),
            conntrack,
        };
        // No insert limit until the agent applies its config.
        let config = DatapathConfig {
            table_size: dataplane.options.table_size,
            conntrack_inserts_per_window: 0,
        };
        dataplane
            .array::<DatapathConfig>(layout::DATAPATH_CONFIG)?
            .set(0, config, 0)
            .map_err(map_err(layout::DATAPATH_CONFIG))?;
        dataplane.bump_generation()?;
        // Over pinned state, the backends an earlier agent wrote are not written again
        // unless they change: their next hops' interfaces go into this load's TX_PORTS now.
        for (_, backend) in dataplane.backends()? {
            if backend.flags & BACKEND_F_NEXTHOP != 0 {
                dataplane.add_tx_port(backend.ifindex)?;
            }
        }
        Ok(dataplane)
    }

    pub fn options(&self) -> &DataplaneOptions {
        &self.options
    }

    /// The XDP program, loaded into the kernel (verified) on first use.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        xdp_program(&mut self.ebpf, layout::LB_PROGRAM)
    }

    /// With [`DataplaneOptions::datapath_log`]: loads `vip_lb_log`, puts it where `vip_lb`
    /// tail-calls it, and returns the reader of its records (to [`forward`]).
    ///
    /// [`forward`]: log::forward
    pub fn start_log(&mut self) -> Result<Option<DatapathLog>> {
        if !self.options.datapath_log {
            return Ok(None);
        }
        let fd = xdp_program(&mut self.ebpf, layout::LB_LOG_PROGRAM)?
            .fd()
            .map_err(|source| DataplaneError::Program {
                program: layout::LB_LOG_PROGRAM,
                source,
            })?
            .try_clone()
            .map_err(DataplaneError::LogReader)?;
        let mut programs: ProgramArray<&mut MapData> =
            ProgramArray::try_from(self.map_mut(layout::LOG_PROGRAM)?)
                .map_err(map_err(layout::LOG_PROGRAM))?;
        programs
            .set(0, &fd, 0)
            .map_err(map_err(layout::LOG_PROGRAM))?;
        let reader = aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, ToTracing)
            .map_err(|e| DataplaneError::LogReader(std::io::Error::other(e)))?;
        Ok(Some(reader))
    }

    /// Attaches `vip_hc` to the egress of `lo` (once; detached when this is dropped): the
    /// program that carries data-path health checks to their backends.
    pub fn attach_health_check_program(&mut self) -> Result<()> {
        if self.health_check_program {
            return Ok(());
        }
        let program_err = |source| DataplaneError::Program {
            program: layout::HEALTH_CHECK_PROGRAM,
            source,
        };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(layout::HEALTH_CHECK_PROGRAM)
            .ok_or(DataplaneError::MissingProgram(layout::HEALTH_CHECK_PROGRAM))?
            .try_into()
            .map_err(program_err)?;
        load_retrying(|| prog.load()).map_err(program_err)?;
        // A tcx link on this kernel; the clsact qdisc is only for the netlink fallback.
        let _ = tc::qdisc_add_clsact("lo");
        prog.attach("lo", TcAttachType::Egress)
            .map_err(program_err)?;
        self.health_check_program = true;
        Ok(())
    }

    /// Attaches to `iface` with a pinned link; see [`attach_xdp_pinned`].
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        modes: &[XdpMode],
        pin_dir: &Path,
    ) -> Result<Option<XdpMode>> {
        let prog = self.program()?;
        attach_xdp_pinned(prog, layout::LB_PROGRAM, iface, modes, pin_dir)
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))
    }

    fn array<V: aya::Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, V>> {
        Array::try_from(self.map_mut(name)?).map_err(map_err(name))
    }

    fn per_cpu_sum<T: aya::Pod + bytemuck::Pod>(
        &self,
        name: &'static str,
        index: u32,
    ) -> Result<T> {
        let map: PerCpuArray<&MapData, T> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        sum_entry(&map, name, index)
    }

    /// Limits new conntrack entries to `per_second` per CPU (0: no limit); the datapath counts
    /// them in windows of 2^INSERT_WINDOW_SHIFT ns.
    pub fn set_conntrack_insert_limit(&mut self, per_second: u32) -> Result<()> {
        let window_ns = (1u64 << INSERT_WINDOW_SHIFT) as f64;
        let per_window = (f64::from(per_second) * window_ns / 1e9).ceil() as u32;
        let config = DatapathConfig {
            table_size: self.options.table_size,
            conntrack_inserts_per_window: per_window,
        };
        self.array::<DatapathConfig>(layout::DATAPATH_CONFIG)?
            .set(0, config, 0)
            .map_err(map_err(layout::DATAPATH_CONFIG))?;
        self.bump_generation()
    }

    /// Moves `CONFIG_GENERATION` on; called after every write to `VIP_META`, `BACKENDS` and
    /// `DATAPATH_CONFIG`, so that no flow's recorded headers made before it hold any longer.
    fn bump_generation(&mut self) -> Result<()> {
        // Objects older than recorded headers (`vip-bench --compare`) have no generation.
        let Some(map) = self.ebpf.map_mut(layout::CONFIG_GENERATION) else {
            return Ok(());
        };
        let mut generation: Array<&mut MapData, u64> =
            Array::try_from(map).map_err(map_err(layout::CONFIG_GENERATION))?;
        let now = generation
            .get(&0, 0)
            .map_err(map_err(layout::CONFIG_GENERATION))?;
        generation
            .set(0, now.wrapping_add(1), 0)
            .map_err(map_err(layout::CONFIG_GENERATION))
    }

    /// Writes a backend (with its next hop) into its slot, and its next hop's interface into
    /// `TX_PORTS` first if it is not there yet.
    pub fn set_backend(&mut self, id: BackendId, backend: &Backend) -> Result<()> {
        if backend.flags & BACKEND_F_NEXTHOP != 0 {
            self.add_tx_port(backend.ifindex)?;
        }
        self.array::<Backend>(layout::BACKENDS)?
            .set(id, backend, 0)
            .map_err(map_err(layout::BACKENDS))?;
        self.bump_generation()
    }

    /// Puts `ifindex` into `TX_PORTS`. Interfaces stay while this load lives (the kernel drops
    /// an entry when its interface goes); one the kernel refuses (gone already, or not a
    /// device a redirect can use) is left out: the datapath redirects by ifindex then.
    fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        if self.tx_ports.contains(&ifindex) {
            return Ok(());
        }
        // Objects older than TX_PORTS (`vip-bench --compare`) redirect by ifindex.
        let Some(map) = self.ebpf.map_mut(layout::TX_PORTS) else {
            return Ok(());
        };
        let mut ports: DevMapHash<&mut MapData> =
            DevMapHash::try_from(map).map_err(map_err(layout::TX_PORTS))?;
        match ports.insert(ifindex, ifindex, None, 0) {
            Ok(()) => {
                self.tx_ports.insert(ifindex);
            }
            Err(e) => {
                tracing::debug!(ifindex, error = %e, "not in TX_PORTS: redirected to by ifindex");
            }
        }
        Ok(())
    }

    /// The interfaces in `TX_PORTS`, in order.
    pub fn tx_ports(&self) -> Result<Vec<u32>> {
        let ports: DevMapHash<&MapData> =
            DevMapHash::try_from(self.map(layout::TX_PORTS)?).map_err(map_err(layout::TX_PORTS))?;
        let mut out = ports
            .keys()
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(map_err(layout::TX_PORTS))?;
        out.sort_unstable();
        Ok(out)
    }

    /// Writes a complete Maglev table into table slot `slot`. Write it into a slot no VIP uses,
    /// then point the VIP at it with [`Dataplane::set_vip`]: no packet sees a half-written table.
    pub fn write_table(&mut self, slot: u32, table: &[BackendId]) -> Result<()> {
        let size = self.options.table_size;
        if table.len() != size as usize {
            return Err(DataplaneError::TableSize {
                got: table.len(),
                want: size,
            });
        }
        if slot >= self.options.table_slots {
            return Err(DataplaneError::TableSlot {
                slot,
                slots: self.options.table_slots,
            });
        }
        let aya::maps::Map::Array(maglev) = self.map(layout::MAGLEV)? else {
            return Err(DataplaneError::MissingMap(layout::MAGLEV));
        };
        mmap::write_mmapped(maglev.fd().as_fd(), (slot * size) as usize, table).map_err(|source| {
            DataplaneError::Mmap {
                map: layout::MAGLEV,
                source,
            }
        })
    }

    /// Adds or replaces a VIP. Replacing the value is atomic for the datapath, which is how a
    /// VIP switches to a new table slot. The VIP's address filter bit is set first, so the
    /// datapath never filters out a VIP it has.
    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.set_filter_bit(vip_filter_bit(&key.addr), true)?;
        let meta = VipMeta { vip: *key, ..*meta };
        self.array::<VipMeta>(layout::VIP_META)?
            .set(meta.vip_id, meta, 0)
            .map_err(map_err(layout::VIP_META))?;
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_mut(layout::VIPS)?).map_err(map_err(layout::VIPS))?;
        vips.insert(key, meta, 0).map_err(map_err(layout::VIPS))?;
        self.bump_generation()
    }

    /// Removes a VIP (if present); its packets pass to the stack from then on. Its filter bit
    /// is cleared afterwards unless another VIP still needs it.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_mut(layout::VIPS)?).map_err(map_err(layout::VIPS))?;
        let vip_id = match vips.get(key, 0) {
            Ok(meta) => meta.vip_id,
            Err(MapError::KeyNotFound) => return Ok(()),
            Err(e) => return Err(map_err(layout::VIPS)(e)),
        };
        vips.remove(key).map_err(map_err(layout::VIPS))?;
        // Established flows of this VIP now find no settings by id, and re-resolve by key.
        self.array::<VipMeta>(layout::VIP_META)?
            .set(vip_id, <VipMeta as bytemuck::Zeroable>::zeroed(), 0)
            .map_err(map_err(layout::VIP_META))?;
        self.bump_generation()?;
        let bit = vip_filter_bit(&key.addr);
        let still_needed = self
            .vips()?
            .iter()
            .any(|(k, _)| vip_filter_bit(&k.addr) == bit);
        if !still_needed {
            self.set_filter_bit(bit, false)?;
        }
        Ok(())
    }

    fn set_filter_bit(&mut self, bit: u32, on: bool) -> Result<()> {
        let mut filter = self.array::<u64>(layout::VIP_FILTER)?;
        let word = filter
            .get(&(bit / 64), 0)
            .map_err(map_err(layout::VIP_FILTER))?;
        let mask = 1u64 << (bit % 64);
        let new = if on { word | mask } else { word & !mask };
        if new != word {
            filter
                .set(bit / 64, new, 0)
                .map_err(map_err(layout::VIP_FILTER))?;
        }
        Ok(())
    }

    /// Every VIP in the map.
    pub fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        let vips: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map(layout::VIPS)?).map_err(map_err(layout::VIPS))?;
        vips.iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(layout::VIPS))
    }

    /// Every present backend slot.
    pub fn backends(&self) -> Result<Vec<(BackendId, Backend)>> {
        let backends: Array<&MapData, Backend> =
            Array::try_from(self.map(layout::BACKENDS)?).map_err(map_err(layout::BACKENDS))?;
        let mut out = Vec::new();
        for (id, b) in backends.iter().enumerate() {
            let b = b.map_err(map_err(layout::BACKENDS))?;
            if b.flags & vip_common::BACKEND_F_PRESENT != 0 {
                out.push((id as BackendId, b));
            }
        }
        Ok(out)
    }

    /// The conntrack tables.
    pub fn conntrack_tables(&self) -> Result<&ConntrackTables> {
        self.conntrack
            .as_ref()
            .ok_or(DataplaneError::MissingMap(layout::CT_TABLE_V4))
    }

    /// Writes a connection-tracking entry (peers' flows; benchmarks and tests fill the table
    /// with it).
    pub fn insert_flow(&mut self, flow: &FlowKey, entry: &ConnEntry) -> Result<()> {
        self.conntrack_tables()?.insert(flow, entry);
        Ok(())
    }

    /// Removes a flow's connection-tracking entry (absent already: nothing to do).
    pub fn remove_flow(&mut self, flow: &FlowKey) -> Result<()> {
        self.conntrack_tables()?.remove(flow);
        Ok(())
    }

    /// Every connection-tracking entry, IPv4 and IPv6 (a snapshot; the datapath keeps changing
    /// it).
    pub fn flows(&self) -> Result<Vec<(FlowKey, ConnEntry)>> {
        Ok(self.conntrack_tables()?.flows())
    }

    /// Global outcome counters, summed over CPUs.
    pub fn stats(&self) -> Result<DatapathStats> {
        self.per_cpu_sum(layout::STATS, 0)
    }

    /// Traffic per VIP (by `vip_id`) as its present backends' counters add up. A running agent
    /// also counts what backends that left had sent (see `apply::VipAccount`).
    pub fn traffic_by_vip(&self) -> Result<std::collections::HashMap<u32, TrafficCounters>> {
        let mut by_vip = std::collections::HashMap::new();
        for (id, b) in self.backends()? {
            *by_vip.entry(b.vip_id).or_default() += self.backend_traffic(id)?;
        }
        Ok(by_vip)
    }

    /// Traffic sent to backend `id`, summed over CPUs.
    pub fn backend_traffic(&self, id: BackendId) -> Result<TrafficCounters> {
        self.per_cpu_sum(layout::BACKEND_STATS, id)
    }

    /// Zeroes backend `id`'s counters: a released id starts afresh when it is reused.
    pub fn reset_backend_traffic(&mut self, id: BackendId) -> Result<()> {
        let name = layout::BACKEND_STATS;
        let mut map: PerCpuArray<&mut MapData, TrafficCounters> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        let zeroes = PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])
            .map_err(DataplaneError::Cpus)?;
        map.set(id, zeroes, 0).map_err(map_err(name))
    }

    /// The connection-tracking entry of a flow, if any.
    pub fn conntrack(&self, flow: &FlowKey) -> Result<Option<ConnEntry>> {
        Ok(self.conntrack_tables()?.get(flow))
    }
}
