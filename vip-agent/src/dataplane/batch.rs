//! Reading a whole hash map in batches (`BPF_MAP_LOOKUP_BATCH`): one system call per few
//! thousand entries, instead of two per entry as a key-by-key walk takes. An upgrade reads an
//! earlier version's conntrack maps this way.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::{MapData, MapError};
use bytemuck::Pod;

use super::error::{DataplaneError, map_err};

/// `BPF_MAP_LOOKUP_BATCH` (linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The error of a failed [`read_all`] of map `name`.
pub(crate) fn error(name: &'static str) -> impl FnOnce(io::Error) -> DataplaneError {
    move |io_error| {
        map_err(name)(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        }))
    }
}

/// Every entry of a (non-per-CPU) hash map, as the kernel hands them out: a snapshot only in
/// so far as the datapath does not change the map meanwhile.
/// A map whose key or value size is not `K`'s or `V`'s (a pin some other tool left) is refused:
/// the kernel would write past the buffers.
pub(crate) fn read_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let info = map.info().map_err(io::Error::other)?;
    let sizes = (info.key_size() as usize, info.value_size() as usize);
    if sizes != (size_of::<K>(), size_of::<V>()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "key and value sizes {sizes:?}, expected {:?}",
                (size_of::<K>(), size_of::<V>())
            ),
        ));
    }
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut keys = vec![K::zeroed(); CHUNK];
    let mut values = vec![V::zeroed(); CHUNK];
    let mut out = Vec::new();
    // A hash map's batch token is the next bucket to read.
    let mut token: u32 = 0;
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const token) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and values of the map's sizes
        // (checked above), and at the two tokens; all outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let done = if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        } else {
            false
        };
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if done {
            return Ok(out);
        }
        token = next;
        first = false;
    }
}
