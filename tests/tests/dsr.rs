//! End to end, in the lab: client → router (BIRD, ECMP) → LB nodes (XDP, BGP) → backends (DSR).

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use vip_tests::lab::{Lab, LabSpec, VIP4, VIP6, echo_all, tcp_hello, udp_hello};

const TIMEOUT: Duration = Duration::from_secs(3);

fn lab(prefix: &str, weights: &[u32]) -> Lab {
    lab_with(prefix, weights, false)
}

fn lab_with(prefix: &str, weights: &[u32], gue: bool) -> Lab {
    vip_tests::require_root();
    let mut spec = LabSpec::new(prefix);
    spec.weights = weights.to_vec();
    spec.gue = gue;
    Lab::up_built(spec).expect("lab up")
}

#[test]
fn tcp_and_udp_flows_reach_backends_that_answer_directly() {
    let lab = lab("vipe2e-flows", &[1, 1, 1]);
    let (per_backend, answered) = lab.in_client(|| {
        let mut per_backend = std::collections::HashMap::<String, usize>::new();
        let mut answered = 0;
        for (vip, client) in [(VIP4, "198.18.0.10"), (VIP6, "fd00:18::10")] {
            let vip: IpAddr = vip.parse().unwrap();
            for i in 0..150 {
                let (_, backend, seen) = tcp_hello(vip, TIMEOUT).expect("TCP to the VIP");
                assert_eq!(
                    seen, client,
                    "the backend must see the client's own address"
                );
                *per_backend.entry(backend).or_default() += 1;
                let (backend, seen) =
                    udp_hello(vip, &format!("u{i}"), TIMEOUT).expect("UDP to the VIP");
                assert_eq!(seen, client);
                *per_backend.entry(backend).or_default() += 1;
                answered += 2;
            }
        }
        (per_backend, answered)
    });
    assert_eq!(answered, 600);
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    // Replies bypass the LB nodes: all they passed to their own stacks (BGP, ARP, ND) is a
    // handful, against the 600 flows' reply packets that went to the client.
    for i in 1..=2 {
        let status = lab.status(&format!("lb{i}"));
        let passed: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("datapath: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("status line");
        assert!(
            passed < 300,
            "lb{i} saw {passed} packets not for a VIP: replies went through it? {status}"
        );
        assert!(
            lab.lb_forwarded(i) > 0,
            "lb{i} carried no traffic: no ECMP?"
        );
    }
}

#[test]
fn flows_spread_over_backends_by_weight() {
    // 1,200 connections over weights 1:2:3. Expected 200/400/600; the binomial standard
    // deviation is 13-17 connections and Maglev's table is within 0.1% of the weights, so
    // a 20% band around each expectation (40-120 connections, at least 4 sd) never fails by chance.
    let lab = lab("vipe2e-weights", &[1, 2, 3]);
    let counts = lab.in_client(|| {
        let mut counts = [0usize; 3];
        for _ in 0..1200 {
            let (_, backend, _) =
                tcp_hello(VIP4.parse().unwrap(), TIMEOUT).expect("TCP to the VIP");
            let i: usize = backend
                .trim_start_matches("be")
                .parse()
                .expect("backend name");
            counts[i - 1] += 1;
        }
        counts
    });
    for (i, (got, weight)) in counts.iter().zip([1.0, 2.0, 3.0]).enumerate() {
        let want = 1200.0 * weight / 6.0;
        assert!(
            ((*got as f64) - want).abs() <= want * 0.2,
            "be{}: {got} connections, expected {want}: {counts:?}",
            i + 1
        );
    }
}

#[test]
fn connections_survive_the_loss_of_an_lb_node() {
    failover(lab("vipe2e-failover", &[1, 1, 1]));
}

#[test]
fn gue_carries_flows_and_survives_an_lb_node_failure() {
    let lab = lab_with("vipe2e-gue", &[1, 1, 1], true);
    for i in 1..=2 {
        let status = lab.status(&format!("lb{i}"));
        assert!(
            status.contains("GUE to port 6080") && !status.contains("IP-in-IP"),
            "{status}"
        );
    }
    let backends = lab.in_client(|| {
        let mut seen = std::collections::HashSet::new();
        for vip in [VIP4, VIP6] {
            for i in 0..60 {
                let vip: IpAddr = vip.parse().unwrap();
                seen.insert(tcp_hello(vip, TIMEOUT).expect("TCP over GUE").1);
                seen.insert(
                    udp_hello(vip, &format!("g{i}"), TIMEOUT)
                        .expect("UDP over GUE")
                        .0,
                );
            }
        }
        seen
    });
    assert_eq!(backends.len(), 3, "{backends:?}");
    failover(lab);
}

fn failover(mut lab: Lab) {
    let mut conns = lab.in_client(|| {
        (0..40)
            .map(|i| {
                let vip: IpAddr = if i % 2 == 0 { VIP4 } else { VIP6 }.parse().unwrap();
                tcp_hello(vip, TIMEOUT).expect("connect").0
            })
            .collect::<Vec<_>>()
    });
    let lb1_before = lab.lb_forwarded(1);
    assert_eq!(echo_all(&mut conns, "before"), 40);
    assert!(
        lab.lb_forwarded(1) > lb1_before,
        "no connection went through lb1"
    );

    lab.kill_lb(1).unwrap();
    let killed = Instant::now();
    while lab.router_next_hops(VIP4) > 1 || lab.router_next_hops(VIP6) > 1 {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the router kept lb1: {}",
            lab.router_route(VIP4)
        );
        thread::sleep(Duration::from_millis(50));
    }
    let converged = killed.elapsed();
    assert!(
        converged > Duration::from_millis(500),
        "withdrawn in {converged:?}: the node did not really vanish"
    );
    for s in &conns {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    assert_eq!(
        echo_all(&mut conns, "after"),
        40,
        "connections lost with lb1"
    );
    let (_, backend, _) = lab
        .in_client(|| tcp_hello(VIP4.parse().unwrap(), TIMEOUT))
        .expect("new connection");
    assert!(backend.starts_with("be"));
}

/// Opens `n` connections to the IPv4 VIP; returns them with the backend each reached.
fn connections(lab: &Lab, n: usize) -> Vec<(std::net::TcpStream, String)> {
    lab.connections(n, TIMEOUT, Duration::from_secs(2))
}

/// Whether a connection still carries data.
fn alive(conn: &mut std::net::TcpStream, tag: &str) -> bool {
    echo_all(std::slice::from_mut(conn), tag) == 1
}

#[test]
fn backend_removal_moves_only_its_flows_and_addition_keeps_established_ones() {
    let mut lab = lab("vipe2e-backends", &[1, 1, 0]);
    // be3 is not configured yet: no flow goes there.
    let mut conns = connections(&lab, 60);
    assert!(
        conns.iter().all(|(_, b)| b != "be3"),
        "an unconfigured backend got flows"
    );

    // Addition: be3 joins; established connections stay where they are (conntrack).
    lab.set_weights(&[1, 1, 1], &[1, 2]).unwrap();
    for (i, (c, b)) in conns.iter_mut().enumerate() {
        assert!(
            alive(c, "after addition"),
            "connection {i} to {b} broke when be3 was added"
        );
    }
    let fresh = connections(&lab, 90);
    let to_be3 = fresh.iter().filter(|(_, b)| b == "be3").count();
    assert!(
        (15..=45).contains(&to_be3),
        "{to_be3} of 90 new connections went to be3"
    );
    conns.extend(fresh);

    // Removal of be1: only its connections move (and break: be2/be3 have no socket for them).
    lab.set_weights(&[0, 1, 1], &[1, 2]).unwrap();
    let mut moved = 0;
    for (i, (c, b)) in conns.iter_mut().enumerate() {
        let ok = alive(c, "after removal");
        if b == "be1" {
            moved += usize::from(!ok);
        } else {
            assert!(ok, "connection {i} to {b} broke when be1 was removed");
        }
    }
    let on_be1 = conns.iter().filter(|(_, b)| b == "be1").count();
    assert_eq!(
        moved, on_be1,
        "connections to the removed backend kept going to it"
    );
    let fresh = connections(&lab, 60);
    assert!(
        fresh.iter().all(|(_, b)| b != "be1"),
        "new flows went to a removed backend"
    );
}
