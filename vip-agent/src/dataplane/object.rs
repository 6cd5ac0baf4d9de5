//! The eBPF objects, embedded at build time (see `build.rs`).

/// The load-balancer object (`vip-ebpf`).
#[cfg(not(no_ebpf_obj))]
pub fn load_balancer() -> &'static [u8] {
    aya::include_bytes_aligned!(env!("VIP_EBPF_OBJ"))
}

/// The load-balancer object built for datapath logs: the same program, without misaligned
/// memory access, which aya-log's encoding cannot be verified with.
#[cfg(not(no_ebpf_obj))]
pub fn load_balancer_with_log() -> &'static [u8] {
    aya::include_bytes_aligned!(env!("VIP_EBPF_LOG_OBJ"))
}

/// The backends' decapsulation object (`vip-decap`).
#[cfg(not(no_ebpf_obj))]
pub fn decap() -> &'static [u8] {
    aya::include_bytes_aligned!(env!("VIP_DECAP_OBJ"))
}

/// The benchmark harness object (`vip-bench`): input-restoring wrapper and XDP_TX floor.
#[cfg(not(no_ebpf_obj))]
pub fn bench_harness() -> &'static [u8] {
    aya::include_bytes_aligned!(env!("VIP_BENCH_OBJ"))
}

#[cfg(no_ebpf_obj)]
pub fn load_balancer() -> &'static [u8] {
    panic!("vip-agent was built without its eBPF object: build with `cargo xtask build`")
}

#[cfg(no_ebpf_obj)]
pub fn load_balancer_with_log() -> &'static [u8] {
    panic!("vip-agent was built without its eBPF object: build with `cargo xtask build`")
}

#[cfg(no_ebpf_obj)]
pub fn decap() -> &'static [u8] {
    panic!("vip-agent was built without its eBPF object: build with `cargo xtask build`")
}

#[cfg(no_ebpf_obj)]
pub fn bench_harness() -> &'static [u8] {
    panic!("vip-agent was built without its eBPF object: build with `cargo xtask build`")
}
