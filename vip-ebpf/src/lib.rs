//! Pieces shared by vip's XDP programs: the load balancer (`vip-ebpf`), the backends'
//! decapsulation program (`vip-decap`) and the benchmark harness (`vip-bench`).
#![no_std]

pub mod packet;

/// The programs' panic handler. Unreachable in a release build that passed the verifier: a
/// reachable panic makes the program fail to load.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
