//! Shared mappings of `BPF_F_MMAPABLE` array maps: Maglev tables written with one copy (one
//! table is 65,537 entries, and one syscall per entry took seconds at start-up), and the
//! conntrack tables read and written in place.

use std::{
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
};

/// A shared mapping of part of a map's value area, unmapped on drop.
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that the kernel writes at any time anyway; its
// users access it through raw pointers and decide what to trust of what they read.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the pages holding bytes `start..start + len` of `map`'s values; the mapping starts
    /// at the page holding `start` (see [`Mapping::as_ptr`]).
    pub(super) fn new(map: BorrowedFd<'_>, start: usize, len: usize) -> std::io::Result<Self> {
        let page = page_size();
        let first = start / page * page;
        let len = (start + len).div_ceil(page) * page - first;
        // SAFETY: a fresh shared mapping of part of the map's value area; the kernel checks the
        // range against the map's size and that the map is mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                first as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    /// The first byte mapped: byte `start / page * page` of the values, page-aligned.
    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `Mapping::new` made.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: plain query of the system page size.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Writes `values` into entries `first..first + values.len()` of a `BPF_F_MMAPABLE` array map
/// of 4-byte values, through a mapping of just the pages that hold them (the kernel maps every
/// page of the range eagerly, so mapping the whole map per table would cost more than the
/// writes). The kernel stores every array value in a multiple of 8 bytes, so each entry is a
/// `u64` here whose low half (little-endian: its first 4 bytes) is the value.
pub(super) fn write_mmapped(
    map: BorrowedFd<'_>,
    first: usize,
    values: &[u32],
) -> std::io::Result<()> {
    const ENTRY: usize = size_of::<u64>();
    let mapping = Mapping::new(map, first * ENTRY, values.len() * ENTRY)?;
    let skip = first * ENTRY % page_size() / ENTRY;
    // SAFETY: the mapping covers entries `first - skip ..= first + values.len() - 1`, from a
    // page boundary (8-byte aligned); `entries` is dropped before `mapping`.
    let entries = unsafe {
        std::slice::from_raw_parts_mut(mapping.as_ptr().cast::<u64>(), skip + values.len())
    };
    for (entry, &value) in entries[skip..].iter_mut().zip(values) {
        *entry = u64::from(value);
    }
    Ok(())
}
