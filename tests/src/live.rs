//! Live frames: BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES`, whose XDP_TX and
//! XDP_REDIRECT the kernel carries out for real (XDP_TX as a redirect back out of the arrival
//! interface), through veths in the calling thread's private network namespace.

use std::time::Duration;

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use vip_common::bench::BENCH_SINK_PROGRAM;

use crate::fixture::{ip, private_netns};

/// The uplink pair, where frames arrive (`vipl-up0`), and the pair toward the backends
/// (`vipl-down0`).
pub const UPLINK: &str = "vipl-up0";
pub const DOWNLINK: &str = "vipl-down0";
/// Each pair's near end and far end.
const PAIRS: [(&str, &str); 2] = [(UPLINK, "vipl-up1"), (DOWNLINK, "vipl-down1")];

/// Two veth pairs in a fresh private netns of the calling thread. A veth hands XDP frames on
/// only to a peer with an XDP program: each far end (`vipl-up1`, `vipl-down1`) drops them with
/// the harness's sink program, counted in its receive statistics.
pub struct Links {
    pub uplink: u32,
    pub downlink: u32,
    /// Holds the sink programs attached (detached when dropped, with the namespace's links).
    _sinks: Ebpf,
}

impl Links {
    pub fn new() -> Self {
        private_netns();
        for (near, far) in PAIRS {
            ip(&["link", "add", near, "type", "veth", "peer", "name", far]);
            // No IPv6 of their own (router solicitations): the far ends count only our frames.
            // /proc/sys/net shows the namespace of the thread that opens it.
            for name in [near, far] {
                let knob = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
                std::fs::write(&knob, "1").unwrap_or_else(|e| panic!("{knob}: {e}"));
                ip(&["link", "set", name, "up"]);
            }
        }
        let mut sinks = EbpfLoader::new()
            .load(vip_agent::dataplane::object::bench_harness())
            .expect("load the harness object");
        let sink: &mut Xdp = sinks
            .program_mut(BENCH_SINK_PROGRAM)
            .expect("sink program")
            .try_into()
            .expect("XDP");
        sink.load().expect("verifier accepts the sink");
        for (_, far) in PAIRS {
            sink.attach(far, XdpMode::Driver)
                .unwrap_or_else(|e| panic!("attach the sink to {far}: {e}"));
        }
        Self {
            uplink: ifindex(UPLINK),
            downlink: ifindex(DOWNLINK),
            _sinks: sinks,
        }
    }

    /// Frames the far end of `near`'s pair has received.
    pub fn received(&self, near: &str) -> u64 {
        let (_, far) = PAIRS
            .into_iter()
            .find(|(n, _)| *n == near)
            .unwrap_or_else(|| panic!("{near} is not a pair's near end"));
        let json = ip(&["-s", "-j", "link", "show", "dev", far]);
        let links: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        links[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .expect("rx packets")
    }
}

impl Default for Links {
    fn default() -> Self {
        Self::new()
    }
}

/// The ifindex of `name` in the calling thread's namespace (/sys shows the root namespace's).
fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("interface name");
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "{name} has an ifindex");
    index
}

/// Frames per batch: the kernel flushes its redirect queues after each.
pub const LIVE_BATCH: u32 = 64;

/// Runs `frame` through `prog` `repeat` times as live frames received on `ifindex`, in batches
/// of [`LIVE_BATCH`]: mean time per frame. The kernel recycles a batch's pages without restoring
/// them, so a program that changes frames (the load balancer does) sees its own output from
/// the second batch on: run one batch at a time, or behind the bench's restoring wrapper.
pub fn run_live(prog: &mut Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> Duration {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
        .into_iter()
        .flat_map(u32::to_ne_bytes)
        .collect();
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat,
        attrs: TestRunAttrs::new().xdp_live_frames(LIVE_BATCH),
        ..Default::default()
    })
    .expect("BPF_PROG_TEST_RUN with live frames")
    .duration
}
