//! VIPs as backends' source addresses, in the lab: backends open connections from the VIP to
//! a server beside the client; the replies, addressed to the VIP, reach whichever LB node ECMP
//! picks, which sends them to the owner of the port's block.

use std::{
    collections::HashSet,
    io::Write,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use vip_tests::lab::{
    EGRESS_PORTS, EGRESS_REST_SECS, Lab, LabSpec, VIP4, VIP6, echo_all, egress_ping, egress_tcp,
    egress_udp, serve_outside,
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// The server's port on the client (outside the data centre).
const SERVER_PORT: u16 = 8080;
const BLOCK: u16 = 100;

fn lab(prefix: &str, weights: &[u32]) -> Lab {
    lab_with(prefix, weights, false)
}

fn lab_with(prefix: &str, weights: &[u32], gue: bool) -> Lab {
    vip_tests::require_root();
    let mut spec = LabSpec::new(prefix);
    spec.weights = weights.to_vec();
    spec.gue = gue;
    spec.egress_block_size = Some(BLOCK);
    let lab = Lab::up_built(spec).expect("lab up");
    serve_outside(&lab.spec.ns("client"), SERVER_PORT).expect("the server beside the client");
    lab
}

fn server(vip: &str) -> SocketAddr {
    let client: IpAddr = if vip == VIP6 {
        "fd00:18::10".parse().unwrap()
    } else {
        "198.18.0.10".parse().unwrap()
    };
    SocketAddr::new(client, SERVER_PORT)
}

/// The ports of backend `i`'s block (1-based backend, block `i - 1`).
fn block_of(i: usize) -> std::ops::RangeInclusive<u16> {
    let first = EGRESS_PORTS.0 + (i as u16 - 1) * BLOCK;
    first..=first + BLOCK - 1
}

/// Every connection worked, from the VIP, from a port of backend `i`'s block; the streams.
fn all_from_block(
    results: Vec<std::io::Result<(TcpStream, SocketAddr)>>,
    vip: &str,
    i: usize,
) -> Vec<TcpStream> {
    results
        .into_iter()
        .map(|r| {
            let (stream, seen) = r.unwrap_or_else(|e| panic!("be{i}'s egress connection: {e}"));
            assert_eq!(seen.ip(), vip.parse::<IpAddr>().unwrap(), "source seen");
            assert!(block_of(i).contains(&seen.port()), "be{i}'s source {seen}");
            stream
        })
        .collect()
}

/// UDP flows that all answered, from backend `i`'s block; their sockets.
fn udp_flows(lab: &Lab, i: usize, vip: &str, n: usize) -> Vec<UdpSocket> {
    let ns = lab.spec.ns(&format!("be{i}"));
    egress_udp(&ns, vip.parse().unwrap(), server(vip), n, TIMEOUT)
        .into_iter()
        .map(|r| {
            let (socket, seen) = r.unwrap_or_else(|e| panic!("be{i}'s egress UDP flow: {e}"));
            assert!(block_of(i).contains(&seen.port()), "be{i}'s source {seen}");
            socket
        })
        .collect()
}

/// Sends on every UDP flow again; how many answered.
fn udp_again(sockets: &[UdpSocket]) -> usize {
    sockets
        .iter()
        .filter(|s| {
            let mut buf = [0u8; 1500];
            s.send(b"again").is_ok() && s.recv(&mut buf).is_ok_and(|n| buf[..n].ends_with(b"again"))
        })
        .count()
}

/// Reply packets LB node `i` sent to egress block owners (its status, JSON).
fn egress_replies(lab: &Lab, i: usize) -> u64 {
    let out = lab.lb_cli(i, &["status", "-o", "json"]).expect("status");
    let json: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    fn sum(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| match (k.as_str(), v) {
                    ("traffic", serde_json::Value::Array(t)) => {
                        t.first().and_then(|p| p.as_u64()).unwrap_or(0)
                    }
                    _ => sum(v),
                })
                .sum(),
            serde_json::Value::Array(a) => a.iter().map(sum).sum(),
            _ => 0,
        }
    }
    sum(&json)
}

#[test]
fn egress_from_every_backend_through_both_lb_nodes_survives_an_lb_node_death() {
    let mut lab = lab("vipeg-lbdeath", &[1, 1, 1]);
    // Ingress on the same VIP at the same time.
    let mut ingress: Vec<TcpStream> = lab
        .connections(20, TIMEOUT, TIMEOUT)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for i in 1..=3 {
        let ns = lab.spec.ns(&format!("be{i}"));
        for (vip, n) in [(VIP4, 100), (VIP6, 20)] {
            let results = egress_tcp(&ns, vip.parse().unwrap(), server(vip), n, TIMEOUT);
            tcp.extend(all_from_block(results, vip, i));
            udp.extend(udp_flows(&lab, i, vip, n));
        }
    }
    assert_eq!((tcp.len(), udp.len()), (360, 360));
    // ICMP echo from the VIP: the identifier is translated into the block and back.
    for i in 1..=3 {
        let ns = lab.spec.ns(&format!("be{i}"));
        for vip in [VIP4, VIP6] {
            let to = server(vip).ip();
            egress_ping(&ns, vip.parse().unwrap(), to, 7 + i as u16, TIMEOUT)
                .unwrap_or_else(|e| panic!("be{i}: ping from {vip}: {e}"));
        }
    }
    assert_eq!(echo_all(&mut tcp, "before"), 360);
    assert_eq!(
        echo_all(&mut ingress, "before"),
        20,
        "ingress beside egress"
    );
    for i in 1..=2 {
        assert!(
            egress_replies(&lab, i) > 0,
            "replies must reach the owners through LB node {i} too (ECMP)"
        );
    }

    // `which` names a port's block and owner, as the loaded program answers.
    let which = lab
        .lb_cli(
            2,
            &[
                "which",
                "--vip",
                "198.19.0.1:40150",
                "--flow",
                "198.18.0.10:8080",
            ],
        )
        .expect("which");
    assert!(
        which.contains("owner of egress block 1 198.18.12.2"),
        "{which}"
    );

    lab.kill_lb(1).expect("kill lb1");
    // Replies hashed to lb1 are lost until the router drops its route (BGP hold time): TCP
    // retransmits them, a UDP datagram would be gone, so the flows are tried once it has.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while lab.router_next_hops(VIP4) > 1 || lab.router_next_hops(VIP6) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the router kept lb1's route"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        echo_all(&mut tcp, "after"),
        360,
        "egress TCP after lb1 died"
    );
    assert_eq!(udp_again(&udp), 360, "egress UDP flows after lb1 died");
    assert_eq!(
        echo_all(&mut ingress, "after"),
        20,
        "ingress after lb1 died"
    );
}

#[test]
fn backend_changes_keep_running_egress_flows_and_a_full_block_fails_only_its_backend() {
    let mut lab = lab("vipeg-change", &[1, 1, 0]);
    let prefix = lab.spec.prefix.clone();
    let ns = |i: usize| format!("{prefix}-be{i}");
    let vip: IpAddr = VIP4.parse().unwrap();
    let be1 = egress_tcp(&ns(1), vip, server(VIP4), 60, TIMEOUT);
    let mut be1 = all_from_block(be1, VIP4, 1);
    let be1_udp = udp_flows(&lab, 1, VIP4, 60);
    // be3 added (on the LB nodes and on itself), be2 removed: be1's flows go on.
    lab.set_weights(&[1, 0, 1], &[1, 2]).expect("new backends");
    lab.reconfigure_backend(3).expect("be3 takes its block");
    assert_eq!(echo_all(&mut be1, "after the change"), 60);
    assert_eq!(udp_again(&be1_udp), 60);
    let be3 = egress_tcp(&ns(3), vip, server(VIP4), 10, TIMEOUT);
    let mut be3 = all_from_block(be3, VIP4, 3);

    // be2's block rests: nobody gets its replies, on any LB node, for the rest.
    let status = lab.lb_cli(2, &["status"]).expect("status");
    assert!(
        status.contains("block 1 (ports 40100-40199): nobody, resting"),
        "{status}"
    );
    std::thread::sleep(Duration::from_secs(EGRESS_REST_SECS + 2));
    let status = lab.lb_cli(2, &["status"]).expect("status");
    assert!(!status.contains("resting"), "the rest ended: {status}");

    // be1's block is 100 ports: with 60 in use, 40 more connections fit and the next fails,
    // on be1 alone; be3 goes on opening connections.
    let more = egress_tcp(&ns(1), vip, server(VIP4), 40, TIMEOUT);
    let mut more = all_from_block(more, VIP4, 1);
    let full = egress_tcp(&ns(1), vip, server(VIP4), 1, Duration::from_secs(2));
    assert!(full[0].is_err(), "a connection beyond the block must fail");
    let be3_more = egress_tcp(&ns(3), vip, server(VIP4), 10, TIMEOUT);
    be3.extend(all_from_block(be3_more, VIP4, 3));
    assert_eq!(echo_all(&mut be3, "be3"), 20);
    assert_eq!(echo_all(&mut more, "be1"), 40);
    let seen: HashSet<u16> = more
        .iter()
        .chain(&be1)
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    assert_eq!(seen.len(), 100, "each connection its own port");
}

#[test]
fn egress_replies_take_the_vips_gue_encapsulation() {
    let lab = lab_with("vipeg-gue", &[1, 1, 1], true);
    for i in 1..=3 {
        let ns = lab.spec.ns(&format!("be{i}"));
        for vip in [VIP4, VIP6] {
            let results = egress_tcp(&ns, vip.parse().unwrap(), server(vip), 10, TIMEOUT);
            let mut streams = all_from_block(results, vip, i);
            assert_eq!(echo_all(&mut streams, "gue"), 10, "be{i} from {vip}");
            assert_eq!(udp_flows(&lab, i, vip, 10).len(), 10);
        }
    }
    // The egress entries carry the VIP's encapsulation: GUE, no IP-in-IP anywhere.
    for i in 1..=2 {
        let status = lab.status(&format!("lb{i}"));
        assert!(
            status.contains("egress tcp/198.19.0.1 ports 40000-40999")
                && status.contains("GUE to port 6080")
                && !status.contains("IP-in-IP"),
            "{status}"
        );
    }
}

#[test]
fn an_egress_range_over_a_served_port_is_refused() {
    vip_tests::require_root();
    let dir = std::env::temp_dir().join("vipeg-check");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("overlap.toml");
    let mut file = std::fs::File::create(&path).unwrap();
    write!(
        file,
        "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"198.18.2.2\"\n\n\
         [[vip]]\naddress = \"{VIP4}\"\nprotocol = \"tcp\"\nport = 40080\n\
         [[vip.backend]]\naddress = \"198.18.11.2\"\n\n\
         [[egress]]\nvip = \"{VIP4}\"\nports = \"40000-40999\"\nblock_size = 100\n\
         [[egress.backend]]\naddress = \"198.18.11.2\"\nblock = 0\n"
    )
    .unwrap();
    let out = std::process::Command::new(vip_tests::node::agent_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("check-config");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("overlaps a served port"), "{text}");
    assert!(text.contains("serves port 40080"), "{text}");
}
