//! Shared pieces of vip's kernel tests: one packet builder, a fixture that loads a private copy
//! of the real XDP program through the agent's own `Dataplane`, and a decoder for its output.

pub mod fixture;
pub mod lab;
pub mod live;
pub mod node;
pub mod packet;
pub mod peering;
pub mod router;
pub mod rows;
pub mod tc;

/// Panics with a clear message unless running as root: these tests load programs into the kernel.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "vip's datapath tests load XDP programs and need root (run `cargo xtask test` as root)"
    );
}
