//! Through the lab in network namespaces: throughput, packets per second, failover.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use crate::harness::median;

/// TCP throughput through the lab: client → router → LB node (XDP) → backends, against the same
/// hops with the LB node only routing, and against router → backend directly (one hop fewer),
/// alternating so all see the same machine load. Medians of 3 runs of 5 s, 8 parallel flows.
pub(crate) fn lab_throughput(md: &mut String) {
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
/// router waits for the hold time, or for BFD at 100 ms x 3 where it runs), until the router's
/// route has only the survivors; and a backend's service dying, until both LB nodes have taken
/// it out of their tables.
pub(crate) fn failover(md: &mut String) {
    use vip_tests::lab::{Lab, LabSpec, VIP4};
    const RUNS: usize = 5;
    const BFD_MS: u64 = 100;
    let (mut stopped, mut died, mut died_bfd, mut backend) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let limit = Duration::from_secs(20);
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    for run in 0..RUNS {
        for bfd in [None, Some(BFD_MS)] {
            let mut spec = LabSpec::new(&format!("vipbfo{run}"));
            spec.lbs = 3;
            spec.bfd = bfd;
            spec.health =
                Some("check = \"tcp\"\ninterval = 0.5\ntimeout = 0.3\nrise = 2\nfall = 2".into());
            let mut lab = match Lab::up_built(spec) {
                Ok(lab) => lab,
                Err(e) => {
                    writeln!(md, "\n## Failover\n\nnot measured: {e}").unwrap();
                    return;
                }
            };
            if bfd.is_some() {
                // The routes are up, so BFD is (BGP waits for it); a second for the Poll
                // Sequences that bring it from 1 s to its configured rate.
                std::thread::sleep(Duration::from_secs(1));
                let _ = lab.kill_lb(2);
                died_bfd.push(ms(time_until(limit, || lab.router_next_hops(VIP4) == 2)));
                continue;
            }
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
    }
    writeln!(md, "\n## Failover (lab, median of {RUNS})\n").unwrap();
    writeln!(
        md,
        "Three LB nodes announce the VIPs to a BIRD router (ECMP, hold time 3 s); times are from \
         the event until the router's kernel route (or the surviving LB node's table) shows it, \
         polled every 10 ms. A dying node is cut off at the router (its packets dropped there) \
         and its agent killed. Connections survive these events; the lab tests check that.\n"
    )
    .unwrap();
    writeln!(md, "| event | until | ms |\n|---|---|---:|").unwrap();
    let rows = [
        (
            "LB node stopped (SIGTERM: withdraw, Cease)",
            "router routes to the other two",
            stopped,
        ),
        (
            "LB node dies (no message)",
            "router routes to the survivors (hold time 3 s)",
            died,
        ),
        (
            "LB node dies (no message), BFD 100 ms x 3",
            "router routes to the survivors (detection 300 ms)",
            died_bfd,
        ),
        (
            "backend's service dies",
            "LB node took it out of its tables (0.5 s × fall 2)",
            backend,
        ),
    ];
    for (event, until, runs) in rows {
        writeln!(md, "| {event} | {until} | {:.0} |", median(runs)).unwrap();
    }
}
