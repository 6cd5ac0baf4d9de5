//! What egress addresses cost packets to served ports (the bound: one compare), and what
//! an egress reply costs: the same cases through two load balancers, one of them with the VIP's
//! address also an egress address, timed back to back in every round.

use std::fmt::Write as _;

use vip_tests::{fixture::*, packet::*, rows::*};

use crate::{
    datapath::configured,
    harness::{Harness, REPEAT, median, program_fd},
};

/// Rounds of the comparison.
const ROUNDS: usize = 41;

pub(crate) fn egress_cost(md: &mut String, harness: &mut Harness) {
    let mut plain = configured();
    let mut egress = configured();
    let web4 = egress.web4.clone();
    egress
        .lb
        .egress(&web4, (40_000, 40_999, 100), &[(0, 0), (1, 1)]);
    let served = ["TCP SYN to a VIP", "established TCP", "UDP"];
    let cases: Vec<(&str, Vec<u8>)> = timed_rows(&plain)
        .into_iter()
        .filter(|row| served.contains(&row.name))
        .map(|row| (row.name, row.frame.build()))
        .collect();
    let reply = Frame::tcp("203.0.113.7", 443, "198.18.100.1", 40_150, TCP_ACK).build();
    for lb in [&mut plain.lb, &mut egress.lb] {
        for (_, frame) in &cases {
            lb.run(frame);
        }
    }
    let (action, _) = egress.lb.run(&reply);
    assert_eq!(action, XDP_TX, "an egress reply goes to its block's owner");
    let (plain_fd, egress_fd) = (program_fd(&mut plain.lb), program_fd(&mut egress.lb));
    let mut samples = vec![(Vec::new(), Vec::new()); cases.len()];
    let mut reply_ns = Vec::new();
    for _ in 0..ROUNDS {
        for ((_, frame), (without, with)) in cases.iter().zip(&mut samples) {
            without.push(harness.time(&plain_fd, frame, REPEAT / 10).0);
            with.push(harness.time(&egress_fd, frame, REPEAT / 10).0);
        }
        reply_ns.push(harness.time(&egress_fd, &reply, REPEAT / 10).0);
    }
    let floor = harness.wrapped_floor;
    writeln!(
        md,
        "\n## Egress addresses: what packets to served ports pay\n"
    )
    .unwrap();
    writeln!(
        md,
        "The same packets through two load balancers, one whose VIP address is also an egress \
         address (`[[egress]]`, ports 40000-40999 in blocks of 100), timed back to back in each \
         of {ROUNDS} rounds ({} iterations a case); net ns (wrapper subtracted), medians. A \
         packet to a served port pays one compare for egress; a reply to an egress port is \
         the owner-table lookup without conntrack.\n",
        REPEAT / 10
    )
    .unwrap();
    writeln!(
        md,
        "| case | without egress ns | with egress ns | difference ns |\n|---|---:|---:|---:|"
    )
    .unwrap();
    for ((name, _), (without, with)) in cases.iter().zip(samples) {
        let (a, b) = (median(without) - floor, median(with) - floor);
        writeln!(md, "| {name} | {a:.1} | {b:.1} | {:+.1} |", b - a).unwrap();
    }
    writeln!(
        md,
        "| reply to an egress port (TCP ACK) | | {:.1} | |",
        median(reply_ns) - floor
    )
    .unwrap();
}
