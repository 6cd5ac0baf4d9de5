//! What egress addresses cost packets to served ports (the bound: one compare), and what
//! an egress reply costs: the same cases through one load balancer, its VIP's address an
//! egress address in every other round, so that both sides run the same program and maps.

use std::fmt::Write as _;

use vip_tests::{fixture::*, packet::*, rows::*};

use crate::{
    datapath::configured,
    harness::{Harness, REPEAT, median, program_fd},
};

/// Rounds of the comparison (each with and without egress).
const ROUNDS: usize = 41;
/// The egress range: ports 40000-40999 in blocks of 100.
const RANGE: (u16, u16, u16) = (40_000, 40_999, 100);

pub(crate) fn egress_cost(md: &mut String, harness: &mut Harness) {
    let mut services = configured();
    let web4 = services.web4.clone();
    let served = ["TCP SYN to a VIP", "established TCP", "UDP"];
    let cases: Vec<(&str, Vec<u8>)> = timed_rows(&services)
        .into_iter()
        .filter(|row| served.contains(&row.name))
        .map(|row| (row.name, row.frame.build()))
        .collect();
    let reply = Frame::tcp("203.0.113.7", 443, "198.18.100.1", 40_150, TCP_ACK).build();
    let lb = &mut services.lb;
    for (_, frame) in &cases {
        lb.run(frame);
    }
    let fd = program_fd(lb);
    let mut samples = vec![(Vec::new(), Vec::new()); cases.len()];
    let mut reply_ns = Vec::new();
    for _ in 0..ROUNDS {
        for with_egress in [false, true] {
            if with_egress {
                lb.egress(&web4, RANGE, &[(0, 0), (1, 1)]);
                let (action, _) = lb.run(&reply);
                assert_eq!(action, XDP_TX, "an egress reply goes to its block's owner");
                reply_ns.push(harness.time(&fd, &reply, REPEAT / 10).0);
            }
            for ((_, frame), (without, with)) in cases.iter().zip(&mut samples) {
                let ns = harness.time(&fd, frame, REPEAT / 10).0;
                if with_egress {
                    with.push(ns)
                } else {
                    without.push(ns)
                }
            }
            if with_egress {
                lb.remove_egress(web4.addr);
            }
        }
    }
    let floor = harness.wrapped_floor;
    writeln!(
        md,
        "\n## Egress addresses: what packets to served ports pay\n"
    )
    .unwrap();
    writeln!(
        md,
        "The same packets through one load balancer whose VIP address is an egress address \
         (`[[egress]]`, ports 40000-40999 in blocks of 100) in every other round, {ROUNDS} \
         rounds each way ({} iterations a case); net ns (wrapper subtracted), medians. A \
         packet to a served port pays one compare for egress; a reply to an egress port is \
         the owner-table lookup without conntrack. \"A/A\": the difference between the odd and \
         the even rounds without egress, the noise of this comparison on this machine.\n",
        REPEAT / 10
    )
    .unwrap();
    writeln!(
        md,
        "| case | without egress ns | with egress ns | difference ns | A/A difference ns |\n\
         |---|---:|---:|---:|---:|"
    )
    .unwrap();
    for ((name, _), (without, with)) in cases.iter().zip(samples) {
        // The same comparison between two halves of the rounds without egress: what the
        // machine's noise alone makes of a difference.
        let half = |parity: usize| {
            let rounds = without.iter().enumerate().filter(|(i, _)| i % 2 == parity);
            median(rounds.map(|(_, ns)| *ns).collect())
        };
        let noise = half(1) - half(0);
        let (a, b) = (median(without) - floor, median(with) - floor);
        writeln!(
            md,
            "| {name} | {a:.1} | {b:.1} | {:+.1} | {noise:+.1} |",
            b - a
        )
        .unwrap();
    }
    writeln!(
        md,
        "| reply to an egress port (TCP ACK) | | {:.1} | | |",
        median(reply_ns) - floor
    )
    .unwrap();
}
