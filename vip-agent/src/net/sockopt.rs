//! `setsockopt` for the options the standard library and tokio do not expose (TCP-MD5 for BGP
//! peers, SO_MARK for data-path health checks).

use std::os::fd::AsRawFd;

/// Sets `level`/`name` on `socket` to `value`, a plain C value of the type the option takes.
pub(crate) fn set<T: Copy>(
    socket: &impl AsRawFd,
    level: i32,
    name: i32,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes from a live `T`; the caller passes the
    // type the kernel expects for this option (`T: Copy`: plain data).
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
