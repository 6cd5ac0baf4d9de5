//! The benchmark harness's contract: the frame its wrapper program restores before each run.

use bytemuck::{Pod, Zeroable};

/// Largest frame the benchmark wrapper restores.
pub const BENCH_FRAME_MAX: usize = 256;

/// Value of the harness's `BENCH_FRAME` map (one entry): the input frame of the case being timed.
/// `BPF_PROG_TEST_RUN` with `repeat` runs every iteration on the same buffer, so the wrapper
/// copies this frame back before each tail call into the program under test.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BenchFrame {
    /// Frame length in bytes, 1..=BENCH_FRAME_MAX.
    pub len: u32,
    /// Nonzero: the offset of 4 bytes (an IPv4 source address) that the wrapper overwrites
    /// with `seq` before each run, so every run is a new flow (timing conntrack inserts).
    pub new_flow_at: u32,
    /// The wrapper's running count of new flows (written back after each run).
    pub seq: u32,
    pub _pad: u32,
    pub bytes: [u8; BENCH_FRAME_MAX],
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `bytemuck::Pod`.
unsafe impl aya::Pod for BenchFrame {}

/// Map and program names of the harness object.
pub const BENCH_FRAME: &str = "BENCH_FRAME";
pub const BENCH_TARGET: &str = "BENCH_TARGET";
pub const BENCH_RESTORE_PROGRAM: &str = "bench_restore";
pub const BENCH_FLOOR_PROGRAM: &str = "bench_floor_tx";
/// XDP_DROP: on the far end of a veth that live frames are sent out of (a veth passes XDP
/// frames on only to a peer with an XDP program).
pub const BENCH_SINK_PROGRAM: &str = "bench_sink";
