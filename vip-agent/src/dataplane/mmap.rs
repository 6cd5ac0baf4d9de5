//! Writing Maglev tables through a shared mapping of the `BPF_F_MMAPABLE` `MAGLEV` array: one
//! table is 65,537 entries, and one syscall per entry took seconds at start-up.

use std::os::fd::{AsRawFd as _, BorrowedFd};

/// Writes `values` into entries `first..first + values.len()` of a `BPF_F_MMAPABLE` array map
/// of 4-byte values, through a shared mapping of just the pages that hold them (the kernel maps
/// every page of the range eagerly, so mapping the whole map per table would cost more than the
/// writes). The kernel stores every array value in a multiple of 8 bytes, so each entry is a
/// `u64` here whose low half (little-endian: its first 4 bytes) is the value.
pub(super) fn write_mmapped(
    map: BorrowedFd<'_>,
    first: usize,
    values: &[u32],
) -> std::io::Result<()> {
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
