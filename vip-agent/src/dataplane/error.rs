//! What can go wrong with the datapath, each variant naming what failed; the cause is the
//! error's source.

use std::path::PathBuf;

use aya::{maps::MapError, programs::ProgramError};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("Maglev table size {0} must be a prime number")]
    TableSizeNotPrime(u32),
    #[error("loading the eBPF object failed (is this root, with BTF and bpffs?)")]
    Load(#[source] aya::EbpfError),
    #[error("creating pin directory {path} (is bpffs mounted at /sys/fs/bpf?)")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("counting this machine's CPUs")]
    Cpus(#[source] std::io::Error),
    #[error("starting the datapath log reader")]
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
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: mmap (pinned by an older agent? `vip-agent detach` first)")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("Maglev table has {got} slots, the datapath was loaded with {want}")]
    TableSize { got: usize, want: u32 },
    #[error("XDP link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "another XDP program is attached to {iface}: see `bpftool net show dev {iface}`, and \
         detach it (or `vip-agent detach` if it is an earlier vip's without pins)"
    )]
    InterfaceTaken {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("conntrack table {map} has {count} buckets, not a power of two")]
    ConntrackBuckets { map: &'static str, count: u32 },
    #[error("removing pin {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("table slot {slot} out of range (0..{slots})")]
    TableSlot { slot: u32, slots: u32 },
}

pub(crate) type Result<T> = std::result::Result<T, DataplaneError>;

pub(crate) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}
