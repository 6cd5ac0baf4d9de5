//! Pieces shared by vip's XDP programs: the load balancer (`vip-ebpf`), the backends'
//! decapsulation program (`vip-decap`) and the benchmark harness (`vip-bench`).
#![no_std]

pub mod packet;
