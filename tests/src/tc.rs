//! Dropping every frame on an interface, both ways, with a two-instruction tc program attached
//! through tcx links: a link that stays up but carries nothing, as a dead host looks to its
//! router. This kernel has no `matchall` classifier, and blackhole rules do not silence sockets
//! bound to a device (BFD's), hence a program.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// `r0 = TC_ACT_SHOT (2); exit`.
static DROP: [u64; 2] = [
    u64::from_le_bytes([0xb7, 0x00, 0, 0, 2, 0, 0, 0]),
    u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
];

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<RawFd> {
    // SAFETY: `attr` is a zero-padded union bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd as RawFd)
}

/// Drops everything `dev` (in the calling thread's network namespace) receives and sends,
/// until the returned links are closed.
pub fn drop_all(dev: &str) -> io::Result<Vec<OwnedFd>> {
    let name = CString::new(dev).map_err(io::Error::other)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let license = c"GPL";
    let mut load = [0u8; 128];
    load[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    load[4..8].copy_from_slice(&(DROP.len() as u32).to_ne_bytes());
    load[8..16].copy_from_slice(&(DROP.as_ptr() as u64).to_ne_bytes());
    load[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    let program = unsafe { OwnedFd::from_raw_fd(bpf(BPF_PROG_LOAD, &mut load)?) };
    let mut links = Vec::new();
    for direction in [BPF_TCX_INGRESS, BPF_TCX_EGRESS] {
        let mut attach = [0u8; 128];
        let fd = std::os::fd::AsRawFd::as_raw_fd(&program) as u32;
        attach[0..4].copy_from_slice(&fd.to_ne_bytes());
        attach[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        attach[8..12].copy_from_slice(&direction.to_ne_bytes());
        // SAFETY: as above.
        links.push(unsafe { OwnedFd::from_raw_fd(bpf(BPF_LINK_CREATE, &mut attach)?) });
    }
    Ok(links)
}
