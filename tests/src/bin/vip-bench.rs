//! `cargo xtask bench`: ns per packet of the datapath with BPF_PROG_TEST_RUN, written to
//! BENCHMARKS.md.
//!
//! With `repeat`, the kernel runs every iteration on the same buffer, so from the second
//! iteration on a program would see its own encapsulated output. Each case therefore runs
//! behind the harness's `bench_restore` wrapper, which copies the input frame back and
//! tail-calls the program under test. The wrapper's own cost is measured in the same run (the
//! trivial XDP_TX program with and without the wrapper) and subtracted. Every case's output
//! after the timed runs is checked against a plain single run of the same frame.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader,
    maps::{Array, ProgramArray},
    programs::{ProgramFd, TestRun as _, TestRunOptions, Xdp},
};
use vip_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    bench::{
        BENCH_FLOOR_PROGRAM, BENCH_FRAME, BENCH_FRAME_MAX, BENCH_RESTORE_PROGRAM, BENCH_TARGET,
        BenchFrame,
    },
    layout::{DEFAULT_CONNTRACK_ENTRIES, DEFAULT_TABLE_SIZE},
};
use vip_tests::{fixture::*, packet::*};

/// Iterations per timed run, and timed runs per case (the median is reported).
const REPEAT: u32 = 200_000;
const RUNS: usize = 15;

/// The case that inserts into conntrack: a handshake's first ACK, every run a new flow.
const FIRST_ACK: &str = "first ACK of a new flow (conntrack insert)";
/// Established flows in turn, each found in conntrack but not in the per-CPU flow cache.
const CACHE_MISS: &str = "established TCP, many flows in turn (flow cache misses)";
const ETH_HLEN: usize = 14;

/// Katran's figures measured on this machine kind (ns, net of the wrapper): the targets.
const KATRAN: [(&str, f64); 4] = [
    ("TCP SYN to a VIP", 144.0),
    ("established TCP", 58.0),
    ("UDP", 82.0),
    ("non-VIP packet", 16.0),
];

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    expect_action: u32,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "TCP SYN to a VIP",
            frame: Frame::tcp("198.18.50.1", 40000, "198.18.100.1", 80, TCP_SYN).build(),
            expect_action: XDP_TX,
        },
        Case {
            name: "established TCP",
            frame: Frame::tcp("198.18.50.1", 40001, "198.18.100.1", 80, TCP_ACK).build(),
            expect_action: XDP_TX,
        },
        Case {
            name: "UDP",
            frame: Frame::udp("198.18.50.1", 40002, "198.18.100.1", 53).build(),
            expect_action: XDP_TX,
        },
        Case {
            name: "IPv6 TCP SYN",
            frame: Frame::tcp("fd00:50::1", 40000, "fd00:100::1", 443, TCP_SYN).build(),
            expect_action: XDP_TX,
        },
        Case {
            name: "IPv6 established TCP",
            frame: Frame::tcp("fd00:50::1", 40001, "fd00:100::1", 443, TCP_ACK).build(),
            expect_action: XDP_TX,
        },
        Case {
            name: "non-VIP packet",
            frame: Frame::tcp("198.18.50.1", 40000, "198.18.200.1", 80, TCP_ACK).build(),
            expect_action: XDP_PASS,
        },
    ]
}

/// The datapath cases' backends and VIPs.
fn configure(lb: &mut Lb) {
    lb.backend(0, "198.18.1.1")
        .backend(1, "198.18.1.2")
        .backend(2, "198.18.1.3")
        .backend(3, "fd00:1::1")
        .backend(4, "fd00:1::2");
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1, 2]));
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_UDP, 53, &[0, 1, 2]));
    lb.vip(&VipSpec::new("fd00:100::1", IPPROTO_TCP, 443, &[3, 4]));
}

/// One timed run: mean ns per iteration as the kernel reports it, and the last output.
fn timed(prog: &mut Xdp, frame: &[u8], repeat: u32) -> (f64, u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (duration_ns(r.duration), r.return_value, out)
}

/// The harness's input-restoring wrapper, the program every case is timed through.
fn restore_wrapper(harness: &mut aya::Ebpf) -> &mut Xdp {
    harness
        .program_mut(BENCH_RESTORE_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap()
}

/// A descriptor of `lb`'s program, for the wrapper's program array.
fn program_fd(lb: &mut Lb) -> ProgramFd {
    lb.dataplane
        .program()
        .unwrap()
        .fd()
        .unwrap()
        .try_clone()
        .unwrap()
}

fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn set_frame(frames: &mut Array<aya::maps::MapData, BenchFrame>, frame: &[u8]) {
    frames
        .set(0, bench_frame(frame), 0)
        .expect("write BENCH_FRAME");
}

fn bench_frame(frame: &[u8]) -> BenchFrame {
    assert!(frame.len() <= BENCH_FRAME_MAX);
    let mut f = BenchFrame {
        len: frame.len() as u32,
        new_flow_at: 0,
        seq: 0,
        _pad: 0,
        bytes: [0; BENCH_FRAME_MAX],
    };
    f.bytes[..frame.len()].copy_from_slice(frame);
    f
}

fn main() {
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let output = arg("--output")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("BENCHMARKS.md"));
    // `--only SECTION` (maglev, lab, startup, control-plane): the datapath cases and that
    // section, for working on one of them; `cargo xtask bench` runs everything.
    let only = arg("--only");
    let wanted = |section: &str| only.as_deref().is_none_or(|o| o == section);
    vip_tests::require_root();

    let mut lb = Lb::with_table_size(DEFAULT_TABLE_SIZE);
    configure(&mut lb);

    let mut harness = EbpfLoader::new()
        .load(vip_agent::dataplane::object::bench_harness())
        .expect("load the harness object");
    for name in [BENCH_RESTORE_PROGRAM, BENCH_FLOOR_PROGRAM] {
        let p: &mut Xdp = harness
            .program_mut(name)
            .expect(name)
            .try_into()
            .expect("XDP");
        p.load().expect("verifier accepts the harness");
    }
    let floor_fd: ProgramFd = {
        let p: &Xdp = harness
            .program(BENCH_FLOOR_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        p.fd().unwrap().try_clone().unwrap()
    };
    let lb_fd = program_fd(&mut lb);
    let mut targets: ProgramArray<aya::maps::MapData> =
        ProgramArray::try_from(harness.take_map(BENCH_TARGET).unwrap()).unwrap();
    let mut frames: Array<aya::maps::MapData, BenchFrame> =
        Array::try_from(harness.take_map(BENCH_FRAME).unwrap()).unwrap();

    // Floor and wrapper cost, measured between cases too so drift shows in the medians.
    let floor_frame = cases()[0].frame.clone();
    let mut floor_direct = Vec::new();
    let mut floor_wrapped = Vec::new();
    let mut measure_floor =
        |harness: &mut aya::Ebpf,
         frames: &mut Array<aya::maps::MapData, BenchFrame>,
         targets: &mut ProgramArray<aya::maps::MapData>| {
            let floor: &mut Xdp = harness
                .program_mut(BENCH_FLOOR_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            floor_direct.push(timed(floor, &floor_frame, REPEAT).0);
            set_frame(frames, &floor_frame);
            targets.set(0, &floor_fd, 0).unwrap();
            let wrapper = restore_wrapper(harness);
            let (ns, action, out) = timed(wrapper, &floor_frame, REPEAT);
            assert_eq!(
                (action, &out),
                (XDP_TX, &floor_frame),
                "floor through the wrapper"
            );
            floor_wrapped.push(ns);
        };

    // References first: one plain run per case (it also creates the conntrack entry of an
    // "established" case, as its first packet would).
    let cases = cases();
    let references: Vec<(u32, Vec<u8>)> = cases
        .iter()
        .map(|case| {
            let (action, out) = lb.run(&case.frame);
            assert_eq!(action, case.expect_action, "{}", case.name);
            let (_, again) = lb.run(&case.frame);
            assert_eq!(again, out, "{}: deterministic output", case.name);
            (action, out)
        })
        .collect();
    // `--compare OBJECT`: this build against another build of vip-ebpf, case by case.
    if let Some(path) = arg("--compare") {
        let object = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut other = Lb::from_object(&object, lb.dataplane.options().clone());
        configure(&mut other);
        let other_fd = program_fd(&mut other);
        for case in &cases {
            other.run(&case.frame);
        }
        // Short runs, many rounds, the two builds back to back: a spell of load from the
        // machine's other tenants hits both alike.
        const ROUNDS: usize = 101;
        let mut samples = vec![(Vec::new(), Vec::new()); cases.len()];
        for _ in 0..ROUNDS {
            for (case, (this_ns, other_ns)) in cases.iter().zip(&mut samples) {
                set_frame(&mut frames, &case.frame);
                for (fd, ns) in [(&lb_fd, &mut *this_ns), (&other_fd, &mut *other_ns)] {
                    targets.set(0, fd, 0).unwrap();
                    ns.push(timed(restore_wrapper(&mut harness), &case.frame, REPEAT / 10).0);
                }
            }
        }
        // Both behind the same wrapper: the difference is the programs' alone.
        println!("| case | this build ns | {path} ns | difference ns |\n|---|---:|---:|---:|");
        for (case, (this_ns, other_ns)) in cases.iter().zip(samples) {
            let (a, b) = (median(this_ns), median(other_ns));
            println!("| {} | {a:.1} | {b:.1} | {:+.1} |", case.name, a - b);
        }
        return;
    }
    // `--spin CASE [--runs N]`: time one case N times (default 400, about ten seconds) and
    // stop, for `perf record -a` to profile.
    if let Some(name) = arg("--spin") {
        let runs: u32 = arg("--runs").map_or(400, |n| n.parse().expect("--runs N"));
        let case = cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("--spin: no case named {name:?}"));
        set_frame(&mut frames, &case.frame);
        targets.set(0, &lb_fd, 0).unwrap();
        let wrapper = restore_wrapper(&mut harness);
        for _ in 0..runs {
            timed(wrapper, &case.frame, REPEAT);
        }
        return;
    }
    // Then rounds over all cases and the floor: a spell of load from the machine's other
    // tenants hits every case of a round alike, and the medians keep the calm rounds.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..RUNS {
        measure_floor(&mut harness, &mut frames, &mut targets);
        for ((case, (want_action, want_out)), samples) in
            cases.iter().zip(&references).zip(&mut samples)
        {
            set_frame(&mut frames, &case.frame);
            targets.set(0, &lb_fd, 0).unwrap();
            let wrapper = restore_wrapper(&mut harness);
            let (ns, action, out) = timed(wrapper, &case.frame, REPEAT);
            assert_eq!(
                action, *want_action,
                "{}: action of the timed runs",
                case.name
            );
            assert_eq!(&out, want_out, "{}: output of the timed runs", case.name);
            samples.push(ns);
        }
    }
    let mut results: Vec<(&str, f64)> = cases
        .iter()
        .zip(samples)
        .map(|(case, samples)| (case.name, median(samples)))
        .collect();
    // New flows: the wrapper gives every run's ACK another source address, so each takes the
    // Maglev path and inserts into conntrack (evicting, once the LRU is full).
    let first_ack = Frame::tcp("198.18.50.1", 40003, "198.18.100.1", 80, TCP_ACK);
    let samples = flows_in_turn(
        &mut harness,
        (&mut frames, &mut targets),
        &lb_fd,
        (&first_ack, REPEAT, false),
    );
    results.push((FIRST_ACK, median(samples)));
    let (samples, spread_flows) = flow_cache_misses(&mut harness, (&mut frames, &mut targets));
    results.push((CACHE_MISS, median(samples)));
    let direct = median(floor_direct);
    let wrapped = median(floor_wrapped);

    let mut md = String::new();
    writeln!(md, "# Benchmarks\n").unwrap();
    writeln!(md, "Command: `cargo xtask bench` (run as root).  ").unwrap();
    writeln!(md, "Date: {}  ", shell("date -u +%Y-%m-%dT%H:%M:%SZ")).unwrap();
    writeln!(
        md,
        "Machine: {} cores, {}, Linux {}\n",
        shell("nproc"),
        shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs"),
        shell("uname -r")
    )
    .unwrap();
    writeln!(md, "## Datapath: ns per packet (BPF_PROG_TEST_RUN)\n").unwrap();
    writeln!(
        md,
        "Median of {RUNS} rounds; a round times the floor and every case once, \
         {REPEAT} iterations each, so a spell of load from the machine's other tenants hits \
         every case alike. Every case runs behind the input-restoring wrapper; \"net\" is the \
         case's time minus the time of the trivial XDP_TX program behind the same wrapper \
         ({wrapped:.1} ns, measured in every round): what the program adds over one that returns at once. A trivial program run \
         directly, without the wrapper, takes {direct:.1} ns here (test-run loop overhead). \
         Maglev table size {DEFAULT_TABLE_SIZE}; the output of the timed runs is checked \
         against a plain run. The machine is shared: compare ratios within one run.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| case | vip net ns | wrapped ns | Katran target ns | vs target |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|").unwrap();
    writeln!(
        md,
        "| trivial XDP_TX program (floor) | 0.0 | {wrapped:.1} | | |"
    )
    .unwrap();
    for (name, ns) in &results {
        let net = ns - wrapped;
        let target = KATRAN.iter().find(|(n, _)| n == name).map(|(_, t)| *t);
        let (target_s, ratio_s) = match target {
            Some(t) => (format!("{t:.0}"), format!("{:.2}x", net / t)),
            None => (String::new(), String::new()),
        };
        writeln!(
            md,
            "| {name} | {net:.1} | {ns:.1} | {target_s} | {ratio_s} |"
        )
        .unwrap();
    }
    let net = |name: &str| {
        results
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, ns)| ns - wrapped)
    };
    if let (Some(syn), Some(ack)) = (net("TCP SYN to a VIP"), net(FIRST_ACK)) {
        writeln!(
            md,
            "\nNew TCP connections per second and core (SYN + first ACK, the ACK inserting \
             into a full LRU): {:.1} million. Spoofed SYNs insert nothing (see \
             docs/operations.md); every other new flow pays the insert.",
            1e3 / (syn + ack)
        )
        .unwrap();
    }
    if let Some(established) = net("established TCP") {
        // Without the wrapper, a program takes its net time plus the test-run loop's.
        writeln!(
            md,
            "\nEstablished TCP against the trivial XDP_TX program, both run directly: \
             {:.1} ns / {direct:.1} ns = {:.2}x (target: within 3x).",
            established + direct,
            (established + direct) / direct
        )
        .unwrap();
    }
    writeln!(
        md,
        "\nEstablished IPv4 flows are served from a per-CPU flow cache in front of the conntrack \
         LRU map (see docs/operations.md); the cases above use one flow each, as a hot flow \
         would. \"Many flows in turn\": {spread_flows} flows already in conntrack, every packet \
         another, so each misses the flow cache and pays the LRU lookup, whose buckets and \
         entries are then rarely in the CPU's caches: the worst case of an established packet."
    )
    .unwrap();
    table_scaling(
        &mut md,
        &mut Harness {
            ebpf: &mut harness,
            targets: &mut targets,
            frames: &mut frames,
            wrapped_floor: wrapped,
        },
    );
    if wanted("maglev") {
        maglev_builds(&mut md);
    }
    if wanted("lab") {
        lab_throughput(&mut md);
    }
    if wanted("startup") {
        agent_startup(&mut md);
    }
    if wanted("control-plane") {
        control_plane(&mut md);
    }
    if wanted("failover") {
        failover(&mut md);
    }
    print!("{md}");
    std::fs::write(&output, md).expect("write BENCHMARKS.md");
    eprintln!("wrote {}", output.display());
}

/// `RUNS` timed runs of `repeat` iterations of `frame` through `lb_fd`, the wrapper writing
/// another IPv4 source address into every iteration's frame (1, 2, ...; from 1 again every
/// run if `anew`, else counting on across runs): raw ns per packet.
fn flows_in_turn(
    harness: &mut aya::Ebpf,
    (frames, targets): (
        &mut Array<aya::maps::MapData, BenchFrame>,
        &mut ProgramArray<aya::maps::MapData>,
    ),
    lb_fd: &ProgramFd,
    (frame, repeat, anew): (&Frame, u32, bool),
) -> Vec<f64> {
    let frame = frame.build();
    let mut spread = bench_frame(&frame);
    spread.new_flow_at = (ETH_HLEN + 12) as u32;
    targets.set(0, lb_fd, 0).unwrap();
    frames.set(0, spread, 0).expect("write BENCH_FRAME");
    (0..RUNS)
        .map(|_| {
            if anew {
                frames.set(0, spread, 0).expect("write BENCH_FRAME");
            }
            let (ns, action, _) = timed(restore_wrapper(harness), &frame, repeat);
            assert_eq!(action, XDP_TX, "flows in turn");
            ns
        })
        .collect()
}

/// Established flows the per-CPU flow cache cannot serve, through a load balancer of its own
/// with the default conntrack size: every iteration's ACK is another of many flows already in
/// conntrack (a run visits each once, so the cache never has it): raw ns per packet, and the
/// number of flows.
fn flow_cache_misses(
    harness: &mut aya::Ebpf,
    maps: (
        &mut Array<aya::maps::MapData, BenchFrame>,
        &mut ProgramArray<aya::maps::MapData>,
    ),
) -> (Vec<f64>, u32) {
    let mut lb = Lb::with_sizes(DEFAULT_TABLE_SIZE, DEFAULT_CONNTRACK_ENTRIES);
    configure(&mut lb);
    let ack = Frame::tcp("198.18.50.1", 40004, "198.18.100.1", 80, TCP_ACK);
    lb.run(&ack.build());
    let entry = lb
        .dataplane
        .conntrack(&ack.flow())
        .unwrap()
        .expect("conntrack entry");
    // The agent's inserts land in one CPU's LRU list, which holds that CPU's share of the map.
    let flows =
        (DEFAULT_CONNTRACK_ENTRIES / aya::util::nr_cpus().unwrap() as u32 * 3 / 4).min(100_000);
    for seq in 1..=flows {
        let mut flow = ack.flow();
        flow.src[..4].copy_from_slice(&seq.to_be_bytes());
        lb.dataplane
            .insert_flow(&flow, &entry)
            .expect("fill conntrack");
    }
    let before = lb.dataplane.stats().unwrap();
    let samples = flows_in_turn(harness, maps, &program_fd(&mut lb), (&ack, flows, true));
    let after = lb.dataplane.stats().unwrap();
    assert_eq!(
        (
            after.conntrack_hit - before.conntrack_hit,
            after.conntrack_miss
        ),
        (u64::from(flows) * RUNS as u64, before.conntrack_miss),
        "every packet of the flows in turn found its conntrack entry (hits, misses)"
    );
    (samples, flows)
}

/// The harness, ready to time one program: the input-restoring wrapper and the maps it uses.
struct Harness<'a> {
    ebpf: &'a mut aya::Ebpf,
    targets: &'a mut ProgramArray<aya::maps::MapData>,
    frames: &'a mut Array<aya::maps::MapData, BenchFrame>,
    /// The trivial program's time behind the wrapper, subtracted from every result.
    wrapped_floor: f64,
}

impl Harness<'_> {
    /// Net ns per packet of an established flow (`frame`, a TCP ACK) through `lb`: the median
    /// of `RUNS`, each run's output checked against a plain run.
    fn established_ns(&mut self, lb: &mut Lb, frame: &[u8]) -> f64 {
        let (want_action, want_out) = lb.run(frame);
        assert_eq!(want_action, XDP_TX);
        let lb_fd = program_fd(lb);
        self.targets.set(0, &lb_fd, 0).unwrap();
        set_frame(self.frames, frame);
        let wrapper = restore_wrapper(self.ebpf);
        let samples = (0..RUNS)
            .map(|_| {
                let (ns, action, out) = timed(wrapper, frame, REPEAT);
                assert_eq!((action, &out), (want_action, &want_out), "timed output");
                ns - self.wrapped_floor
            })
            .collect();
        median(samples)
    }
}

/// Established-flow cost with 1, 1,000 and 1,000,000 flows in conntrack, and with 1, 100 and
/// 10,000 VIPs configured: hash and array lookups should not grow with their fill (cache
/// misses aside).
fn table_scaling(md: &mut String, harness: &mut Harness) {
    let frame = Frame::tcp("198.18.50.1", 40001, "198.18.100.1", 80, TCP_ACK).build();
    let spec = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1]);

    let mut lb = Lb::with_sizes(DEFAULT_TABLE_SIZE, 2_200_000);
    lb.backend(0, "198.18.1.1").backend(1, "198.18.1.2");
    let vip_id = lb.vip(&spec);
    writeln!(md, "\n## Established flow vs table fill\n").unwrap();
    writeln!(
        md,
        "Same method. Conntrack is filled with other flows first; VIPs are added around the \
         measured one (table size 251 for them all).\n"
    )
    .unwrap();
    fill_levels(
        (md, harness),
        (&mut lb, &frame),
        ("flows in conntrack", [1, 1_000, 1_000_000]),
        |lb, filled| {
            let mut flow = vip_common::FlowKey::v4(
                (0xc612_0000u32 + (filled >> 16)).to_be_bytes(),
                [198, 18, 100, 1],
                IPPROTO_TCP,
            );
            flow.src_port = (filled as u16).to_be_bytes();
            flow.dst_port = 80u16.to_be_bytes();
            let entry = vip_common::ConnEntry {
                backend: filled % 2,
                vip_id,
                last_seen_ns: 0,
                flow_hash: 0,
                backend_tag: 0,
                _pad: 0,
            };
            lb.dataplane
                .insert_flow(&flow, &entry)
                .expect("fill conntrack");
        },
    );
    drop(lb);

    const MANY: u32 = 10_000;
    let mut lb = Lb::with_options(vip_agent::dataplane::DataplaneOptions {
        table_size: 251,
        table_slots: MANY + 8,
        max_vips: MANY + 8,
        ..Default::default()
    });
    lb.backend(0, "198.18.1.1").backend(1, "198.18.1.2");
    lb.vip(&spec);
    fill_levels(
        (md, harness),
        (&mut lb, &frame),
        ("VIPs configured", [1, 100, MANY]),
        |lb, configured| {
            let addr = format!("198.19.{}.{}", configured / 250, 1 + configured % 250);
            lb.vip(&VipSpec::new(&addr, IPPROTO_TCP, 80, &[0, 1]));
        },
    );
}

/// Times the established flow `frame` through `lb` at each of `levels` of fill (`what`),
/// `grow` adding the `i`th item (from 1) between them, and writes the table.
fn fill_levels(
    (md, harness): (&mut String, &mut Harness),
    (lb, frame): (&mut Lb, &[u8]),
    (what, levels): (&str, [u32; 3]),
    mut grow: impl FnMut(&mut Lb, u32),
) {
    writeln!(md, "\n| {what} | established TCP net ns |\n|---:|---:|").unwrap();
    let mut filled = 1u32;
    for level in levels {
        while filled < level {
            grow(lb, filled);
            filled += 1;
        }
        writeln!(md, "| {level} | {:.1} |", harness.established_ns(lb, frame)).unwrap();
    }
}

/// Maglev table builds (userspace, single core) and the disruption of removing one backend.
fn maglev_builds(md: &mut String) {
    use vip_common::maglev::{MaglevBackend, MaglevTable};
    writeln!(md, "\n## Maglev table builds (one core)\n").unwrap();
    writeln!(
        md,
        "Median of 5 builds. \"moved\": slots that change when one backend leaves, against the \
         ideal (the removed backend's own slots, 1/N). Target: build under 5 ms at 1,000 backends; \
         moved within 1.2x of ideal plus the removed backend's share. Maglev's extra movement \
         grows as table size / backends shrinks; the last row shows the paper's larger table \
         (ten times the memory per VIP) for 1,000 backends.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| table size | backends | build ms | moved % | ideal % | ratio |"
    )
    .unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|---:|").unwrap();
    let sizes = [
        (DEFAULT_TABLE_SIZE, 10u32),
        (DEFAULT_TABLE_SIZE, 100),
        (DEFAULT_TABLE_SIZE, 1_000),
        (655_373, 1_000),
    ];
    for (size, n) in sizes {
        let backends: Vec<MaglevBackend> = (0..n)
            .map(|i| MaglevBackend {
                addr: std::net::IpAddr::from([10, 0, (i >> 8) as u8, i as u8]),
                weight: 1,
                id: i,
            })
            .collect();
        let mut times = Vec::new();
        let mut table = None;
        for _ in 0..5 {
            let start = Instant::now();
            table = Some(MaglevTable::build(size, &backends).unwrap());
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let table = table.unwrap();
        let after = MaglevTable::build(size, &backends[1..]).unwrap();
        let moved = table.moved_slots(&after) as f64 / f64::from(size) * 100.0;
        let ideal = 100.0 / f64::from(n);
        writeln!(
            md,
            "| {size} | {n} | {:.2} | {moved:.2} | {ideal:.2} | {:.2}x |",
            median(times),
            moved / ideal
        )
        .unwrap();
    }
}

/// TCP throughput through the lab: client → router → LB node (XDP) → backends, against the same
/// hops with the LB node only routing, and against router → backend directly (one hop fewer),
/// alternating so all see the same machine load. Medians of 3 runs of 5 s, 8 parallel flows.
fn lab_throughput(md: &mut String) {
    use vip_tests::lab::{Lab, LabSpec, VIP4};
    let mut spec = LabSpec::new("vipbench");
    spec.lbs = 1;
    let mut lab = match Lab::up_built(spec) {
        Ok(lab) => lab,
        Err(e) => {
            writeln!(md, "\n## Lab throughput\n\nnot measured: {e}").unwrap();
            return;
        }
    };
    // be1 through the LB node (routed there, not balanced), be2 straight from the router.
    let (through_lb, direct_be) = ("198.18.11.2", "198.18.12.2");
    if let Err(e) = lab.route_through_lb(through_lb, 1) {
        writeln!(md, "\n## Lab throughput\n\nnot measured: {e}").unwrap();
        return;
    }
    let paths = [VIP4, through_lb, direct_be];
    writeln!(
        md,
        "\n## Lab throughput (veth, iperf3, 8 TCP flows, median of 3 × 5 s)\n"
    )
    .unwrap();
    writeln!(
        md,
        "Three paths in one run: through the LB node balanced by vip (XDP, IP-in-IP, DSR); \
         through the same LB node, which only routes the packets back to the router (vip stays \
         attached and passes them: not for a VIP); and straight from the router to a backend. \
         Target: the LB path at least 90% of the routed one.\n"
    )
    .unwrap();
    three_paths(md, "Gbit/s", paths, |to| lab.iperf(to, 8, 5).unwrap_or(0.0));

    // Packets per second: 64-byte UDP datagrams, one flow; all VIP traffic to be1, the
    // backend the "routed through the LB node" baseline reaches too.
    if let Err(e) = lab.set_weights(&[1, 0, 0], &[1]) {
        writeln!(md, "\npackets per second not measured: {e}").unwrap();
        return;
    }
    writeln!(
        md,
        "\n## Lab packets per second (veth, iperf3 UDP, 64-byte datagrams, one flow, median of \
         3 × 5 s)\n"
    )
    .unwrap();
    writeln!(
        md,
        "The same three paths, counting datagrams that reach the backend. One sending and one \
         receiving socket on a 2-core machine: the client's and backend's kernels bound this \
         before XDP does.\n"
    )
    .unwrap();
    three_paths(md, "Mpps", paths, |to| {
        lab.iperf_udp(to, 64, 5).unwrap_or(0.0)
    });
}

/// Measures the three lab paths (to the VIP through the LB node, to a backend routed through
/// it, to a backend from the router only) in 3 rounds, so all see the same machine load, and
/// writes their medians and ratios.
fn three_paths(
    md: &mut String,
    unit: &str,
    paths: [&str; 3],
    mut measure: impl FnMut(&str) -> f64,
) {
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (to, samples) in paths.iter().zip(&mut samples) {
            samples.push(measure(to));
        }
    }
    let [lb, lb_routing, direct] = samples.map(median);
    writeln!(md, "| path | {unit} |\n|---|---:|").unwrap();
    writeln!(
        md,
        "| client → VIP through the LB node (XDP, IP-in-IP, DSR) | {lb:.3} |"
    )
    .unwrap();
    writeln!(
        md,
        "| client → backend, routed through the LB node | {lb_routing:.3} |"
    )
    .unwrap();
    writeln!(md, "| client → backend, router only | {direct:.3} |").unwrap();
    ratios(md, lb, lb_routing, direct);
}

/// The LB path against the two baselines, as table rows.
fn ratios(md: &mut String, lb: f64, lb_routing: f64, direct: f64) {
    for (name, base) in [
        ("routed through the LB node", lb_routing),
        ("router only", direct),
    ] {
        writeln!(
            md,
            "| LB path / {name} | {:.0}% |",
            lb / base.max(1e-9) * 100.0
        )
        .unwrap();
    }
}

/// Waits until `done`, polling every 10 ms for at most `limit`: the time it took.
fn time_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(t.elapsed())
}

/// Failover in the lab (3 LB nodes, BGP hold time 3 s, TCP health checks every 0.5 s with fall
/// 2): an LB node stopped (SIGTERM: withdraw and Cease) and one that dies (no message: the
/// router waits for the hold time), until the router's route has only the survivors; and a
/// backend's service dying, until both LB nodes have taken it out of their tables.
fn failover(md: &mut String) {
    use vip_tests::lab::{Lab, LabSpec, VIP4};
    const RUNS: usize = 3;
    let (mut stopped, mut died, mut backend) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let mut spec = LabSpec::new(&format!("vipbfo{run}"));
        spec.lbs = 3;
        spec.health =
            Some("check = \"tcp\"\ninterval = 0.5\ntimeout = 0.3\nrise = 2\nfall = 2".into());
        let mut lab = match Lab::up_built(spec) {
            Ok(lab) => lab,
            Err(e) => {
                writeln!(md, "\n## Failover\n\nnot measured: {e}").unwrap();
                return;
            }
        };
        let limit = Duration::from_secs(20);
        let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        lab.stop_lb(3);
        stopped.push(ms(time_until(limit, || lab.router_next_hops(VIP4) == 2)));
        let _ = lab.kill_lb(2);
        died.push(ms(time_until(limit, || lab.router_next_hops(VIP4) == 1)));
        lab.stop_service(3);
        let down = |lab: &Lab| {
            lab.agent_cli(1, &["backends"])
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.starts_with(&format!("tcp/{VIP4}:80 198.18.13.2 ")) && l.contains("down")
                })
        };
        backend.push(ms(time_until(limit, || down(&lab))));
    }
    writeln!(md, "\n## Failover (lab, median of {RUNS})\n").unwrap();
    writeln!(
        md,
        "Three LB nodes announce the VIPs to a BIRD router (ECMP, hold time 3 s); times are from \
         the event until the router's kernel route (or the surviving LB node's table) shows it, \
         polled every 10 ms. Connections survive these events; the lab tests check that.\n"
    )
    .unwrap();
    writeln!(md, "| event | until | ms |\n|---|---|---:|").unwrap();
    writeln!(
        md,
        "| LB node stopped (SIGTERM: withdraw, Cease) | router routes to the other two | {:.0} |",
        median(stopped)
    )
    .unwrap();
    writeln!(
        md,
        "| LB node dies (no message) | router routes to the survivor (hold time 3 s) | {:.0} |",
        median(died)
    )
    .unwrap();
    writeln!(
        md,
        "| backend's service dies | LB node took it out of its tables (0.5 s × fall 2) | {:.0} |",
        median(backend)
    )
    .unwrap();
}

/// Time from `vip-agent run` until its program is attached with the maps filled (start-up's last
/// step), for 100 VIPs × 10 backends at the default table size: cold, and restarted over the
/// pinned state its predecessor left (where the datapath never stopped forwarding).
fn agent_startup(md: &mut String) {
    use vip_tests::node::Netns;
    const VIPS: u32 = 100;
    const RUNS: usize = 5;
    let (lb, _gateway) = Netns::lb_with_gateway("bench");
    let mut config = format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.0.2\"\npin_dir = \"{}\"\n\
         table_slots = {}\n",
        lb.pin_dir.display(),
        VIPS + 8
    );
    for i in 0..VIPS {
        config += &format!(
            "\n[[vip]]\naddress = \"198.19.0.{}\"\nprotocol = \"tcp\"\nport = 80\n",
            1 + i
        );
        for b in 0..10 {
            config += &format!(
                "[[vip.backend]]\naddress = \"198.18.128.{}\"\n",
                1 + (i + b) % 250
            );
        }
    }
    // --cleanup: the agent removes its pins when it stops, so the next start is cold.
    let started = || {
        let (took, agent) = start_agent(&lb, &config);
        (took.as_secs_f64() * 1e3, agent)
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (ms, mut first) = started();
        cold.push(ms);
        // Killed, not stopped: its pins stay, as after a crash or an upgrade.
        first.kill();
        let (ms, mut second) = started();
        assert!(
            second.log_text().contains("took over pinned state"),
            "{}",
            second.log_text()
        );
        warm.push(ms);
        second.signal(libc::SIGTERM);
        assert!(second.wait(), "{}", second.log_text());
    }
    writeln!(
        md,
        "\n## Agent start-up ({VIPS} VIPs × 10 backends, table size {DEFAULT_TABLE_SIZE}, median of {RUNS})\n"
    )
    .unwrap();
    writeln!(
        md,
        "From `vip-agent run` to the program attached with every map filled. On a restart the \
         old program keeps forwarding from its pinned maps the whole time.\n"
    )
    .unwrap();
    writeln!(md, "| start | ms |\n|---|---:|").unwrap();
    writeln!(md, "| cold (nothing pinned) | {:.0} |", median(cold)).unwrap();
    writeln!(md, "| restart over pinned state | {:.0} |", median(warm)).unwrap();
}

/// The agent's node config for the control-plane runs: room for `vips` VIPs with `backends`
/// backends each, plus spares for the changes.
fn scale_node(
    lb: &vip_tests::node::Netns,
    table_size: u32,
    vips: usize,
    backends: usize,
) -> String {
    format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.0.2\"\npin_dir = \"{}\"\n\
         table_size = {table_size}\ntable_slots = {}\nmax_vips = {}\nmax_backends = {}\n",
        lb.pin_dir.display(),
        vips + 8,
        vips + 8,
        (vips + 8) * backends + 64
    )
}

/// VIP `i` of the scale runs: 198.19.0.1, 198.19.0.2, ... (250 per /24).
fn scale_vip(i: usize, backends: &[String]) -> String {
    let mut v = format!(
        "\n[[vip]]\naddress = \"198.19.{}.{}\"\nprotocol = \"tcp\"\nport = 80\n",
        i / 250,
        1 + i % 250
    );
    for b in backends {
        v += &format!("[[vip.backend]]\naddress = \"{b}\"\n");
    }
    v
}

/// Backend address `i`: 198.18.128.1, ... (250 per /24).
fn scale_backend(i: usize) -> String {
    format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250)
}

/// Starts the agent (`--cleanup`: its pins go when it stops) and waits until it has attached,
/// or taken over a running attachment: the time that took.
fn start_agent(lb: &vip_tests::node::Netns, config: &str) -> (Duration, vip_tests::node::Agent) {
    let t = Instant::now();
    let mut agent = vip_tests::node::Agent::start(lb, config, &["--cleanup"]);
    while !agent.log_text().contains("attached") && !agent.log_text().contains("no gap") {
        assert!(agent.running(), "agent exited: {}", agent.log_text());
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    (t.elapsed(), agent)
}

/// Rewrites the config, sends SIGHUP and waits until `live` says the change is in the maps:
/// the time from the signal to that.
fn reload_until(
    agent: &vip_tests::node::Agent,
    config: &str,
    mut live: impl FnMut() -> bool,
) -> Duration {
    agent.rewrite_config(config);
    let t = Instant::now();
    agent.signal(libc::SIGHUP);
    while !live() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    t.elapsed()
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Control plane at scale, through the real agent: a node with 10,000 VIPs (start-up, memory,
/// adding and removing one VIP) and a VIP with 1,000 backends (replacing one), each from SIGHUP
/// to the change being live in the pinned maps.
fn control_plane(md: &mut String) {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use vip_common::{VipKey, VipMeta, layout};
    const VIPS: usize = 10_000;
    const SMALL_TABLE: u32 = 1021;
    const BACKENDS: usize = 1_000;
    const RUNS: usize = 5;
    let (lb, _gateway) = vip_tests::node::Netns::lb_with_gateway("cplane");
    let vips_map = |lb: &vip_tests::node::Netns| {
        let data = MapData::from_pin(lb.pin_dir.join(layout::VIPS)).expect("pinned VIPS");
        BpfHashMap::<MapData, VipKey, VipMeta>::try_from(Map::HashMap(data)).expect("VIPS")
    };
    let key = |i: usize| {
        VipKey::new(
            format!("198.19.{}.{}", i / 250, 1 + i % 250)
                .parse()
                .unwrap(),
            IPPROTO_TCP,
            80,
        )
    };

    // 10,000 VIPs, two backends each.
    let pair = |i: usize| [scale_backend(i % 250), scale_backend((i + 1) % 250)];
    let base: String = (0..VIPS).map(|i| scale_vip(i, &pair(i))).collect();
    let node = scale_node(&lb, SMALL_TABLE, VIPS + 1, 2);
    let config = format!("{node}{base}");
    let with_one_more = format!("{config}{}", scale_vip(VIPS, &pair(VIPS)));
    let (startup, agent) = start_agent(&lb, &config);
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_mib(agent.pid());
    let map = vips_map(&lb);
    let (mut adds, mut removes) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        adds.push(reload_until(&agent, &with_one_more, || {
            map.get(&key(VIPS), 0).is_ok()
        }));
        removes.push(reload_until(&agent, &config, || {
            map.get(&key(VIPS), 0).is_err()
        }));
    }
    agent.signal(libc::SIGTERM);
    let mut agent = agent;
    assert!(agent.wait(), "{}", agent.log_text());

    // One VIP with 1,000 backends at the default table size; replace one of them.
    let backends: Vec<String> = (0..BACKENDS).map(scale_backend).collect();
    let mut replaced = backends.clone();
    replaced[BACKENDS / 2] = scale_backend(BACKENDS);
    let node = scale_node(&lb, DEFAULT_TABLE_SIZE, 1, BACKENDS + 1);
    let config = format!("{node}{}", scale_vip(0, &backends));
    let changed = format!("{node}{}", scale_vip(0, &replaced));
    let (_, agent) = start_agent(&lb, &config);
    let map = vips_map(&lb);
    let table = || map.get(&key(0), 0).expect("the VIP").table;
    let mut swaps = Vec::new();
    for run in 0..RUNS * 2 {
        let before = table();
        let next = if run % 2 == 0 { &changed } else { &config };
        swaps.push(reload_until(&agent, next, || table() != before));
    }
    agent.signal(libc::SIGTERM);
    let mut agent = agent;
    assert!(agent.wait(), "{}", agent.log_text());

    let ms = |v: Vec<Duration>| median(v.iter().map(|d| d.as_secs_f64() * 1e3).collect());
    writeln!(md, "\n## Control plane at scale (median of {RUNS})\n").unwrap();
    writeln!(
        md,
        "The real agent in a namespace. A change is timed from SIGHUP (config re-read, \
         validated, diffed, applied) until the pinned maps show it: the VIP in `VIPS`, or the \
         VIP pointing at its new Maglev table.\n"
    )
    .unwrap();
    writeln!(md, "| what | ms |\n|---|---:|").unwrap();
    writeln!(
        md,
        "| start-up with {VIPS} VIPs × 2 backends, table size {SMALL_TABLE} (cold, once) | {:.0} |",
        startup.as_secs_f64() * 1e3
    )
    .unwrap();
    writeln!(md, "| add 1 VIP to {VIPS} | {:.1} |", ms(adds)).unwrap();
    writeln!(md, "| remove it again | {:.1} |", ms(removes)).unwrap();
    writeln!(
        md,
        "| replace 1 of {BACKENDS} backends of a VIP, table size {DEFAULT_TABLE_SIZE} | {:.1} |",
        ms(swaps)
    )
    .unwrap();
    writeln!(
        md,
        "\nAgent memory (RSS) at idle with {VIPS} VIPs: {rss:.1} MiB. The datapath's Maglev map \
         for them takes {:.0} MiB more, in the kernel ({} table slots × {SMALL_TABLE} entries × \
         8 bytes).",
        ((VIPS + 9) as f64 * f64::from(SMALL_TABLE) * 8.0) / (1024.0 * 1024.0),
        VIPS + 9
    )
    .unwrap();
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
