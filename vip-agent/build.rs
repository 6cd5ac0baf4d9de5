//! Locates the eBPF object built by `cargo xtask build-ebpf` so the agent can embed it.
//! `VIP_EBPF_DIR` overrides the directory. Without the object the crate still compiles (for
//! stable-only `cargo check`/clippy) and fails at run time with a clear message.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_ebpf_obj)");
    println!("cargo::rerun-if-env-changed=VIP_EBPF_DIR");
    let target =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../target");
    let dir = env::var_os("VIP_EBPF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("bpfel-unknown-none/release"));
    // The datapath-log build of the load balancer (see xtask's `build_ebpf`).
    let log_dir = target.join("ebpf-log/bpfel-unknown-none/release");
    for (obj, var) in [
        (dir.join("vip-ebpf"), "VIP_EBPF_OBJ"),
        (log_dir.join("vip-ebpf"), "VIP_EBPF_LOG_OBJ"),
        (dir.join("vip-decap"), "VIP_DECAP_OBJ"),
        (dir.join("vip-bench"), "VIP_BENCH_OBJ"),
    ] {
        println!("cargo::rerun-if-changed={}", obj.display());
        if obj.exists() {
            let obj = obj.canonicalize().expect("object path resolves");
            println!("cargo::rustc-env={var}={}", obj.display());
        } else {
            println!("cargo::rustc-cfg=no_ebpf_obj");
            println!(
                "cargo::warning={} is missing: run `cargo xtask build-ebpf`",
                obj.display()
            );
        }
    }
}
