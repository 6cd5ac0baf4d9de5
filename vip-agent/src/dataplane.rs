//! Loading the load-balancer program and writing its maps.
//!
//! This is the only code that touches the datapath's maps; the agent, the tests and the benchmark
//! all go through it. Map layouts come from `vip_common::layout`.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc,
        xdp::XdpLink,
    },
};
use vip_common::{
    AddrFamily, Backend, BackendId, ConnEntry, DatapathConfig, DatapathStats, FlowKey, FlowKeyV4,
    INSERT_WINDOW_SHIFT, TrafficCounters, VipKey, VipMeta,
    hash::vip_filter_bit,
    layout::{
        self, DECAP_LAYOUT, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS,
        DEFAULT_TABLE_SIZE, DEFAULT_TABLE_SLOTS, LAYOUT, MapLayout, OBSOLETE_PINS,
    },
    maglev::{MaglevTable, is_prime},
};

use crate::datapath_log::{DatapathLog, ToTracing};

/// aya-log's level global in the eBPF object.
const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("Maglev table size {0} must be a prime number")]
    TableSizeNotPrime(u32),
    #[error("loading the eBPF object failed (is this root, with BTF and bpffs?)")]
    Load(#[source] aya::EbpfError),
    #[error("creating pin directory {path} (is bpffs mounted at /sys/fs/bpf?): {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("counting this machine's CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error("starting the datapath log reader: {0}")]
    LogReader(#[source] std::io::Error),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error(
        "pinned map {path} has key size {key}, value size {value}, {entries} entries; this \
         program needs {want_key}, {want_value}, {want_entries}. It was made by an incompatible \
         vip version or config: detach vip (`vip-agent detach`) to start afresh"
    )]
    PinnedMapMismatch {
        path: PathBuf,
        key: u32,
        value: u32,
        entries: u32,
        want_key: u32,
        want_value: u32,
        want_entries: u32,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: mmap (pinned by an older agent? `vip-agent detach` first): {source}")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("Maglev table has {got} slots, the datapath was loaded with {want}")]
    TableSize { got: usize, want: u32 },
    #[error("XDP link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("table slot {slot} out of range (0..{slots})")]
    TableSlot { slot: u32, slots: u32 },
}

pub(crate) type Result<T> = std::result::Result<T, DataplaneError>;

/// Writes `values` into entries `first..first + values.len()` of a `BPF_F_MMAPABLE` array map
/// of 4-byte values, through a shared mapping of just the pages that hold them (the kernel maps
/// every page of the range eagerly, so mapping the whole map per table would cost more than the
/// writes). The kernel stores every array value in a multiple of 8 bytes, so each entry is a
/// `u64` here whose low half (little-endian: its first 4 bytes) is the value.
fn write_mmapped(map: BorrowedFd<'_>, first: usize, values: &[u32]) -> std::io::Result<()> {
    const ENTRY: usize = size_of::<u64>();
    // SAFETY: plain query of the system page size.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let start = first * ENTRY / page * page;
    let len = ((first + values.len()) * ENTRY).div_ceil(page) * page - start;
    // SAFETY: a fresh shared mapping of part of the map's value area; the kernel checks the
    // range against the map's size and that the map is mmapable.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            map.as_raw_fd(),
            start as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the mapping covers `len` bytes from entry `start / ENTRY`, page-aligned, so
    // 8-byte aligned; it is unmapped below, after the last use of `entries`.
    let entries = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u64>(), len / ENTRY) };
    let skip = first - start / ENTRY;
    for (entry, &value) in entries[skip..skip + values.len()].iter_mut().zip(values) {
        *entry = u64::from(value);
    }
    // SAFETY: unmapping exactly the mapping made above.
    unsafe { libc::munmap(ptr, len) };
    Ok(())
}

pub(crate) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// Sizes fixed when the program is loaded.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// Maglev table size M (prime).
    pub table_size: u32,
    /// Maglev table slots in `MAGLEV` (VIPs plus spares for switching tables).
    pub table_slots: u32,
    /// Entries of each conntrack map (`CONNTRACK_V4` for IPv4 flows, `CONNTRACK` for IPv6).
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
            conntrack_entries: info(layout::CONNTRACK)?.max_entries(),
            max_vips: info(layout::VIPS)?.max_entries(),
            max_backends: info(layout::BACKENDS)?.max_entries(),
            pin_dir: Some(pin_dir.to_owned()),
            datapath_log: false,
        })
    }

    /// Entries each map must have with these options.
    fn max_entries(&self, name: &str) -> Option<u32> {
        match name {
            layout::MAGLEV => Some(self.table_size * self.table_slots),
            layout::CONNTRACK | layout::CONNTRACK_V4 => Some(self.conntrack_entries),
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
}

impl Dataplane {
    /// Loads the embedded load-balancer object (not yet attached) and writes its node config.
    pub fn load(options: DataplaneOptions) -> Result<Self> {
        let object = if options.datapath_log {
            crate::object::load_balancer_with_log()
        } else {
            crate::object::load_balancer()
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
        let mut dataplane = Self {
            ebpf,
            options,
            health_check_program: false,
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
    /// [`forward`]: crate::datapath_log::forward
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

    fn per_cpu_sum(&self, name: &'static str, index: u32) -> Result<TrafficCounters> {
        let map: PerCpuArray<&MapData, TrafficCounters> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let values = map.get(&index, 0).map_err(map_err(name))?;
        let mut sum = TrafficCounters::default();
        for v in values.iter() {
            sum += *v;
        }
        Ok(sum)
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
            .map_err(map_err(layout::DATAPATH_CONFIG))
    }

    /// Writes a backend (with its next hop) into its slot.
    pub fn set_backend(&mut self, id: BackendId, backend: &Backend) -> Result<()> {
        self.array::<Backend>(layout::BACKENDS)?
            .set(id, backend, 0)
            .map_err(map_err(layout::BACKENDS))
    }

    /// Writes a complete Maglev table into table slot `slot`. Write it into a slot no VIP uses,
    /// then point the VIP at it with [`Dataplane::set_vip`]: no packet sees a half-written table.
    pub fn write_table(&mut self, slot: u32, table: &MaglevTable) -> Result<()> {
        let size = self.options.table_size;
        if table.slots().len() != size as usize {
            return Err(DataplaneError::TableSize {
                got: table.slots().len(),
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
        write_mmapped(maglev.fd().as_fd(), (slot * size) as usize, table.slots()).map_err(
            |source| DataplaneError::Mmap {
                map: layout::MAGLEV,
                source,
            },
        )
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
        vips.insert(key, meta, 0).map_err(map_err(layout::VIPS))
    }

    /// Removes a VIP; its packets pass to the stack from then on. Its filter bit is cleared
    /// afterwards unless another VIP still needs it.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_mut(layout::VIPS)?).map_err(map_err(layout::VIPS))?;
        let vip_id = vips.get(key, 0).map_err(map_err(layout::VIPS))?.vip_id;
        vips.remove(key).map_err(map_err(layout::VIPS))?;
        // Established flows of this VIP now find no settings by id, and re-resolve by key.
        self.array::<VipMeta>(layout::VIP_META)?
            .set(vip_id, <VipMeta as bytemuck::Zeroable>::zeroed(), 0)
            .map_err(map_err(layout::VIP_META))?;
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

    /// Writes a connection-tracking entry (benchmarks and tests fill the table with it).
    pub fn insert_flow(&mut self, flow: &FlowKey, entry: &ConnEntry) -> Result<()> {
        if flow.family == AddrFamily::V4 as u8 {
            let name = layout::CONNTRACK_V4;
            let mut map: HashMap<&mut MapData, FlowKeyV4, ConnEntry> =
                HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            map.insert(FlowKeyV4::of(flow), entry, 0)
                .map_err(map_err(name))
        } else {
            let name = layout::CONNTRACK;
            let mut map: HashMap<&mut MapData, FlowKey, ConnEntry> =
                HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            map.insert(flow, entry, 0).map_err(map_err(name))
        }
    }

    /// Every connection-tracking entry, IPv4 and IPv6 (a snapshot; the datapath keeps changing
    /// it).
    pub fn flows(&self) -> Result<Vec<(FlowKey, ConnEntry)>> {
        let v4: HashMap<&MapData, FlowKeyV4, ConnEntry> =
            HashMap::try_from(self.map(layout::CONNTRACK_V4)?)
                .map_err(map_err(layout::CONNTRACK_V4))?;
        let v6: HashMap<&MapData, FlowKey, ConnEntry> =
            HashMap::try_from(self.map(layout::CONNTRACK)?).map_err(map_err(layout::CONNTRACK))?;
        // Entries evicted during the walk show up as errors: skip them.
        let v4 = v4.iter().filter_map(|e| e.ok()).map(|(k, e)| (k.flow(), e));
        Ok(v4.chain(v6.iter().filter_map(|e| e.ok())).collect())
    }

    /// Global outcome counters, summed over CPUs.
    pub fn stats(&self) -> Result<DatapathStats> {
        sum_counters(&self.ebpf, layout::STATS)
    }

    /// Traffic per VIP (by `vip_id`) as its present backends' counters add up. A running agent
    /// also counts what backends that left had sent (see `Balancer::traffic`).
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
        let found = if flow.family == AddrFamily::V4 as u8 {
            let name = layout::CONNTRACK_V4;
            let map: HashMap<&MapData, FlowKeyV4, ConnEntry> =
                HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
            map.get(&FlowKeyV4::of(flow), 0).map_err(|e| (name, e))
        } else {
            let name = layout::CONNTRACK;
            let map: HashMap<&MapData, FlowKey, ConnEntry> =
                HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
            map.get(flow, 0).map_err(|e| (name, e))
        };
        match found {
            Ok(entry) => Ok(Some(entry)),
            Err((_, MapError::KeyNotFound)) => Ok(None),
            Err((name, e)) => Err(map_err(name)(e)),
        }
    }
}

/// Attaches `prog` to `iface`, trying `modes` in order, so that the attachment survives the
/// agent: the XDP link is pinned at `<pin_dir>/links/xdp_<iface>`. If that pin exists (a running
/// datapath from an earlier agent), the link is switched to `prog` atomically, with no packet
/// unhandled. Returns the mode used, or `None` when an existing link was switched.
pub fn attach_xdp_pinned(
    prog: &mut Xdp,
    program: &'static str,
    iface: &str,
    modes: &[XdpMode],
    pin_dir: &Path,
) -> Result<Option<XdpMode>> {
    let link_path = link_pin_path(pin_dir, iface);
    let program_err = |source| DataplaneError::Program { program, source };
    let link_err = |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Link {
        path: link_path.clone(),
        source,
    };
    if link_path.exists() {
        let pinned = PinnedLink::from_pin(&link_path).map_err(|e| link_err(e.into()))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| link_err(e.into()))?;
        prog.attach_to_link(link).map_err(program_err)?;
        return Ok(None);
    }
    let mut last_err = None;
    for &mode in modes {
        match prog.attach(iface, mode) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(program_err)?;
                // Fails if aya had to fall back to netlink: that kernel cannot keep XDP
                // attached across agent restarts.
                let fd_link = FdLink::try_from(link).map_err(|e| link_err(e.into()))?;
                std::fs::create_dir_all(link_path.parent().expect("has a parent"))
                    .map_err(|e| link_err(e.into()))?;
                fd_link.pin(&link_path).map_err(|e| link_err(e.into()))?;
                return Ok(Some(mode));
            }
            Err(e) => {
                tracing::warn!(%iface, ?mode, error = %e, "XDP attach failed");
                last_err = Some(e);
            }
        }
    }
    Err(program_err(last_err.expect("at least one attach mode")))
}

/// Creates a pin directory (under a bpffs mount).
pub(crate) fn create_pin_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
        path: dir.to_owned(),
        source,
    })
}

/// Loads (verifies) the XDP program `name` of `ebpf` on first use.
/// Loads a program, again when the verifier was interrupted: it gives up with EAGAIN when a
/// signal arrives while it works (as libbpf does, up to five attempts).
fn load_retrying(
    mut load: impl FnMut() -> std::result::Result<(), ProgramError>,
) -> std::result::Result<(), ProgramError> {
    let mut attempts = 5;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempts > 1 =>
            {
                attempts -= 1;
            }
            other => return other,
        }
    }
}

pub(crate) fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    let program_err = |source| DataplaneError::Program {
        program: name,
        source,
    };
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(program_err)?;
    if prog.fd().is_err() {
        load_retrying(|| prog.load()).map_err(program_err)?;
    }
    Ok(prog)
}

/// Sums a one-entry per-CPU array of `u64` counters over CPUs.
pub(crate) fn sum_counters<T: aya::Pod + bytemuck::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<T> {
    let map: PerCpuArray<&MapData, T> =
        PerCpuArray::try_from(ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?)
            .map_err(map_err(name))?;
    let values = map.get(&0, 0).map_err(map_err(name))?;
    let mut sum: T = bytemuck::Zeroable::zeroed();
    for cpu in values.iter() {
        let words: &[u64] = bytemuck::cast_slice(bytemuck::bytes_of(cpu));
        let total: &mut [u64] = bytemuck::cast_slice_mut(bytemuck::bytes_of_mut(&mut sum));
        for (s, w) in total.iter_mut().zip(words) {
            *s += w;
        }
    }
    Ok(sum)
}

/// Where the XDP link of `iface` is pinned.
pub fn link_pin_path(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("xdp_{iface}"))
}

/// Removes vip from the node: unpins every XDP link under `pin_dir` (which detaches the
/// program) and every map pin. Returns the interfaces detached.
pub fn detach_all(pin_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut detached = Vec::new();
    let links = pin_dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            std::fs::remove_file(entry.path())?;
            detached.push(name.trim_start_matches("xdp_").to_owned());
        }
        std::fs::remove_dir(&links)?;
    }
    let names = LAYOUT.iter().chain(DECAP_LAYOUT.iter()).map(|l| l.name);
    for name in names.chain(OBSOLETE_PINS) {
        match std::fs::remove_file(pin_dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(detached),
    }
}

/// Refuses a pinned map whose shape differs from what this program needs: aya would reuse it
/// silently, and the program would read garbage.
pub(crate) fn check_pinned(
    path: &Path,
    name: &'static str,
    layouts: &[MapLayout],
    max_entries: Option<u32>,
) -> Result<()> {
    let info = MapInfo::from_pin(path).map_err(map_err(name))?;
    let want = layouts
        .iter()
        .find(|l| l.name == name)
        .ok_or(DataplaneError::MissingMap(name))?;
    let want_entries = max_entries.unwrap_or(0);
    if info.key_size() != want.key_size
        || info.value_size() != want.value_size
        || info.max_entries() != want_entries
    {
        return Err(DataplaneError::PinnedMapMismatch {
            path: path.to_owned(),
            key: info.key_size(),
            value: info.value_size(),
            entries: info.max_entries(),
            want_key: want.key_size,
            want_value: want.value_size,
            want_entries,
        });
    }
    Ok(())
}
