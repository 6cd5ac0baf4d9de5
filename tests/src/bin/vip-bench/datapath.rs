//! The datapath's cases: ns per packet of SYNs, established flows, UDP, IPv6, non-VIP
//! packets, new flows and flow-cache misses, against Katran's figures on this machine kind.

use std::{fmt::Write as _, path::Path};

use vip_common::layout::{DEFAULT_CONNTRACK_ENTRIES, DEFAULT_TABLE_SIZE};
use vip_tests::{fixture::*, packet::*, rows::*};

use crate::harness::{Harness, REPEAT, RUNS, median, program_fd};

/// The case that inserts into conntrack: a handshake's first ACK, every run a new flow.
const FIRST_ACK: &str = "first ACK of a new flow (conntrack insert)";
/// Established flows in turn, each found in conntrack but not in the per-CPU flow cache.
const CACHE_MISS: &str = "established TCP, many flows in turn (flow cache misses)";

/// The first ACK of the new-flow case; the wrapper gives each run another source address.
fn first_ack() -> Frame {
    Frame::tcp("198.18.50.1", 40003, "198.18.100.1", 80, TCP_ACK)
}

/// Katran's figures measured on this machine kind (ns, net of the wrapper): the targets.
const KATRAN: [(&str, f64); 4] = [
    ("TCP SYN to a VIP", 144.0),
    ("established TCP", 58.0),
    ("UDP", 82.0),
    ("non-VIP packet", 16.0),
];

/// A timed case: a fixture row and the action it must end in.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    expect_action: u32,
}

/// The datapath cases: the fixture's timed rows (which the packet tests check field by field).
fn cases(services: &Services) -> Vec<Case> {
    timed_rows(services)
        .into_iter()
        .map(|row| Case {
            name: row.name,
            frame: row.frame.build(),
            expect_action: row.action(),
        })
        .collect()
}

/// The standard services at the default table size.
pub(crate) fn configured() -> Services {
    services_on(Lb::with_table_size(DEFAULT_TABLE_SIZE))
}

/// One plain run per case: the reference output of the timed runs (it also creates the
/// conntrack entry of an "established" case, as its first packet would).
fn references(lb: &mut Lb, cases: &[Case]) -> Vec<(u32, Vec<u8>)> {
    cases
        .iter()
        .map(|case| {
            let (action, out) = lb.run(&case.frame);
            assert_eq!(action, case.expect_action, "{}", case.name);
            let (_, again) = lb.run(&case.frame);
            assert_eq!(again, out, "{}: deterministic output", case.name);
            (action, out)
        })
        .collect()
}

/// This build against another build of vip-ebpf (an object file), case by case: short runs,
/// many rounds, the two builds back to back, so a spell of load hits both alike.
pub(crate) fn compare(harness: &mut Harness, services: &mut Services, path: &Path) {
    let object = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases = cases(services);
    let lb = &mut services.lb;
    references(lb, &cases);
    let options = lb.dataplane.options().clone();
    let mut other = services_on(Lb::from_object(&object, options)).lb;
    let (lb_fd, other_fd) = (program_fd(lb), program_fd(&mut other));
    for case in &cases {
        other.run(&case.frame);
    }
    const ROUNDS: usize = 101;
    let mut samples = vec![(Vec::new(), Vec::new()); cases.len() + 1];
    for _ in 0..ROUNDS {
        for (case, (this_ns, other_ns)) in cases.iter().zip(&mut samples) {
            for (fd, ns) in [(&lb_fd, &mut *this_ns), (&other_fd, &mut *other_ns)] {
                ns.push(harness.time(fd, &case.frame, REPEAT / 10).0);
            }
        }
    }
    // New flows into full conntrack tables (or an older build's maps): each program's filled
    // first, then the two alternate, every packet a flow neither has seen.
    let fill = lb.dataplane.options().conntrack_entries * 2;
    let first_ack = first_ack().build();
    harness.start_flows_in_turn(&first_ack);
    for fd in [&lb_fd, &other_fd] {
        harness.time_flows_in_turn(fd, &first_ack, fill);
    }
    let (this_ns, other_ns) = samples.last_mut().expect("the first-ACK row");
    for _ in 0..ROUNDS {
        for (fd, ns) in [(&lb_fd, &mut *this_ns), (&other_fd, &mut *other_ns)] {
            ns.push(harness.time_flows_in_turn(fd, &first_ack, REPEAT / 10));
        }
    }
    // Both behind the same wrapper: the difference is the programs' alone.
    println!(
        "| case | this build ns | {} ns | difference ns |\n|---|---:|---:|---:|",
        path.display()
    );
    let names = cases.iter().map(|case| case.name).chain([FIRST_ACK]);
    for (name, (this_ns, other_ns)) in names.zip(samples) {
        let (a, b) = (median(this_ns), median(other_ns));
        println!("| {name} | {a:.1} | {b:.1} | {:+.1} |", a - b);
    }
}

/// Times one case `runs` times and stops, for `perf record -a` to profile.
pub(crate) fn spin(harness: &mut Harness, services: &mut Services, name: &str, runs: u32) {
    let cases = cases(services);
    let lb = &mut services.lb;
    references(lb, &cases);
    let lb_fd = program_fd(lb);
    if name == FIRST_ACK {
        let first_ack = first_ack().build();
        harness.start_flows_in_turn(&first_ack);
        for _ in 0..runs {
            harness.time_flows_in_turn(&lb_fd, &first_ack, REPEAT);
        }
        return;
    }
    let case = cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("--spin: no case named {name:?}"));
    for _ in 0..runs {
        harness.time(&lb_fd, &case.frame, REPEAT);
    }
}

/// Rounds over all cases and the floor (a spell of load from the machine's other tenants hits
/// every case of a round alike, and the medians keep the calm rounds), new flows and
/// flow-cache misses; writes the section and sets the harness's floor.
pub(crate) fn report(md: &mut String, harness: &mut Harness, services: &mut Services) {
    let cases = cases(services);
    let lb = &mut services.lb;
    let references = references(lb, &cases);
    let lb_fd = program_fd(lb);
    let mut floor_direct = Vec::new();
    let mut floor_wrapped = Vec::new();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..RUNS {
        // Floor and wrapper cost, measured between cases too so drift shows in the medians.
        let (direct, wrapped) = harness.time_floor(&cases[0].frame);
        floor_direct.push(direct);
        floor_wrapped.push(wrapped);
        for ((case, (want_action, want_out)), samples) in
            cases.iter().zip(&references).zip(&mut samples)
        {
            let (ns, action, out) = harness.time(&lb_fd, &case.frame, REPEAT);
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
    // Maglev path and inserts into conntrack (evicting, once the table is full).
    results.push((
        FIRST_ACK,
        median(harness.flows_in_turn(&lb_fd, &first_ack(), REPEAT, false)),
    ));
    let (samples, spread_flows) = flow_cache_misses(harness);
    results.push((CACHE_MISS, median(samples)));
    let direct = median(floor_direct);
    let wrapped = median(floor_wrapped);
    harness.wrapped_floor = wrapped;

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
             into a full table): {:.1} million. Spoofed SYNs insert nothing (see \
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
             {:.1} ns / {direct:.1} ns = {:.2}x (target: 2x; see docs/performance.md for where \
             the time goes).",
            established + direct,
            (established + direct) / direct
        )
        .unwrap();
    }
    if let (Some(v4), Some(v6)) = (net("established TCP"), net("IPv6 established TCP")) {
        writeln!(
            md,
            "\nIPv6 established TCP against IPv4, net: {v6:.1} ns / {v4:.1} ns = {:.2}x \
             (target: 1.2x).",
            v6 / v4
        )
        .unwrap();
    }
    writeln!(
        md,
        "\nEstablished flows are served from a per-CPU flow cache in front of each conntrack \
         table (see docs/conntrack.md); the cases above use one flow each, as a hot flow \
         would. \"Many flows in turn\": {spread_flows} flows already in conntrack, every packet \
         another, so each misses the flow cache and reads the table, whose buckets are then \
         rarely in the CPU's caches: the worst case of an established packet."
    )
    .unwrap();
}

/// Established flows the per-CPU flow cache cannot serve, through a load balancer of its own
/// with the default conntrack size: every iteration's ACK is another of many flows already in
/// conntrack (a run visits each once, so the cache never has it): raw ns per packet, and the
/// number of flows.
fn flow_cache_misses(harness: &mut Harness) -> (Vec<f64>, u32) {
    let mut lb = services_on(Lb::with_sizes(
        DEFAULT_TABLE_SIZE,
        DEFAULT_CONNTRACK_ENTRIES,
    ))
    .lb;
    let ack = Frame::tcp("198.18.50.1", 40004, "198.18.100.1", 80, TCP_ACK);
    lb.run(&ack.build());
    let entry = lb
        .dataplane
        .conntrack(&ack.flow())
        .unwrap()
        .expect("conntrack entry");
    // An eighth of the table (four times the flow cache's slots): a bucket gets a fifth of
    // them, and evicts one, about once in 6,000, so nearly every packet finds its entry.
    let flows = DEFAULT_CONNTRACK_ENTRIES / 8;
    for seq in 1..=flows {
        let mut flow = ack.flow();
        flow.src[..4].copy_from_slice(&seq.to_be_bytes());
        lb.dataplane
            .insert_flow(&flow, &entry)
            .expect("fill conntrack");
    }
    let before = lb.dataplane.stats().unwrap();
    let samples = harness.flows_in_turn(&program_fd(&mut lb), &ack, flows, true);
    let after = lb.dataplane.stats().unwrap();
    let packets = u64::from(flows) * RUNS as u64;
    let hits = after.conntrack_hit - before.conntrack_hit;
    assert!(
        hits * 1_000 >= packets * 999,
        "the flows in turn found their conntrack entries: {hits} hits of {packets} packets"
    );
    (samples, flows)
}
