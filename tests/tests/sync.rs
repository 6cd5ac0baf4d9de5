//! Flow-state sharing in the lab: three LB nodes behind a BIRD router with ECMP. A backend
//! change leaves flows whose backend the new tables would not choose; those must survive an LB
//! node's death too, through the peers that were told about them.

use std::{
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use vip_tests::lab::{Lab, LabSpec, UDP_PORT, VIP4, VIP6, backend_addrs, echo_all, tcp_hello};

const TIMEOUT: Duration = Duration::from_secs(3);

fn lab(prefix: &str, gue: bool, wrong_key: Option<usize>) -> Lab {
    lab_with(prefix, |spec| {
        spec.gue = gue;
        spec.sync_wrong_key = wrong_key;
    })
}

fn lab_with(prefix: &str, settings: impl FnOnce(&mut LabSpec)) -> Lab {
    vip_tests::require_root();
    let mut spec = LabSpec::new(prefix);
    spec.lbs = 3;
    spec.sync = true;
    settings(&mut spec);
    Lab::up_built(spec).expect("lab up")
}

/// The client's flows: TCP connections and UDP sockets (one flow each) to both VIPs, with the
/// backend that answered each.
struct Flows {
    tcp: Vec<(TcpStream, String)>,
    udp: Vec<(UdpSocket, String)>,
}

impl Flows {
    fn open(lab: &Lab, per_family: usize) -> Self {
        lab.in_client(move || {
            let mut tcp = Vec::new();
            let mut udp = Vec::new();
            for vip in [VIP4, VIP6] {
                let vip: IpAddr = vip.parse().unwrap();
                for i in 0..per_family {
                    let (s, backend, _) = tcp_hello(vip, TIMEOUT).expect("TCP to the VIP");
                    tcp.push((s, backend));
                    let any: SocketAddr = if vip.is_ipv4() {
                        "0.0.0.0:0".parse().unwrap()
                    } else {
                        "[::]:0".parse().unwrap()
                    };
                    let socket = UdpSocket::bind(any).unwrap();
                    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
                    socket.connect(SocketAddr::new(vip, UDP_PORT)).unwrap();
                    let backend = udp_round(&socket, &format!("u{i}")).expect("UDP to the VIP");
                    udp.push((socket, backend));
                }
            }
            Flows { tcp, udp }
        })
    }

    /// Every flow that still reaches its own backend: (TCP, UDP) counts, and the failures.
    fn alive(&mut self, tag: &str) -> (usize, usize, Vec<String>) {
        let mut failures = Vec::new();
        let mut tcp = 0;
        for (i, (s, backend)) in self.tcp.iter_mut().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            if echo_all(std::slice::from_mut(s), tag) == 1 {
                tcp += 1;
            } else {
                failures.push(format!("TCP {i} to {backend}"));
            }
        }
        let mut udp = 0;
        for (i, (s, backend)) in self.udp.iter().enumerate() {
            match udp_round(s, tag) {
                Ok(b) if b == *backend => udp += 1,
                other => failures.push(format!("UDP {i} to {backend}: {other:?}")),
            }
        }
        (tcp, udp, failures)
    }
}

/// One datagram and its answer: the backend that answered.
fn udp_round(socket: &UdpSocket, payload: &str) -> std::io::Result<String> {
    socket.send(payload.as_bytes())?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(reply.split(' ').next().unwrap_or_default().to_owned())
}

/// Drains backend `i` (both its addresses) on every LB node, at run time.
fn drain_everywhere(lab: &Lab, i: usize) {
    let (b4, b6) = backend_addrs(i);
    for lb in 1..=3 {
        for addr in [&b4, &b6] {
            lab.agent_cli(lb, &["drain", "--backend", addr])
                .unwrap_or_else(|e| panic!("drain {addr} on lb{lb}: {e}"));
        }
    }
}

/// Kills LB node `i` and waits until the router spreads its flows over the others.
fn kill_and_converge(lab: &mut Lab, i: usize) {
    lab.kill_lb(i).expect("kill");
    let killed = Instant::now();
    while lab.router_next_hops(VIP4) > 2 || lab.router_next_hops(VIP6) > 2 {
        assert!(killed.elapsed() < Duration::from_secs(20), "no convergence");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_drain_everywhere_and_an_lb_node_death_at_once_keep_every_connection() {
    let mut lab = lab("vipsync-drain", false, None);
    let mut flows = Flows::open(&lab, 45);
    let on_drained = flows.tcp.iter().filter(|(_, b)| b == "be2").count();
    assert!(on_drained > 0, "some flows must be on the drained backend");
    drain_everywhere(&lab, 2);
    kill_and_converge(&mut lab, 1);
    let (tcp, udp, failures) = flows.alive("after");
    assert!(
        failures.is_empty(),
        "{} of {} TCP and {} of {} UDP flows survived; lost: {failures:?}\nlb2: {}",
        tcp,
        flows.tcp.len(),
        udp,
        flows.udp.len(),
        lab.lb_cli(2, &["status"]).unwrap_or_default()
    );
    // The survivors were told: some entries came from peers, none were refused.
    let status = lab.lb_cli(2, &["status"]).expect("status");
    assert!(status.contains("sync peer 198.18.4.2: push up"), "{status}");
    assert!(
        !status.contains("entries applied; rejected: [unknown"),
        "{status}"
    );
}

#[test]
fn gue_flows_of_a_drained_backend_survive_an_lb_node_death() {
    let mut lab = lab("vipsync-gue", true, None);
    let mut flows = Flows::open(&lab, 30);
    drain_everywhere(&lab, 3);
    kill_and_converge(&mut lab, 2);
    let (_, _, failures) = flows.alive("after");
    assert!(failures.is_empty(), "lost: {failures:?}");
}

#[test]
fn a_backend_added_then_an_lb_node_killed_keeps_every_connection() {
    let mut lab = lab_with("vipsync-add", |spec| spec.weights = vec![1, 1, 0]);
    let mut flows = Flows::open(&lab, 45);
    // be3 joins: Maglev gives it slots of be1 and be2, whose flows there become exceptions.
    lab.set_weights(&[1, 1, 1], &[1, 2, 3]).expect("be3 added");
    kill_and_converge(&mut lab, 3);
    let (_, _, failures) = flows.alive("after");
    assert!(failures.is_empty(), "lost: {failures:?}");
}

/// lb1 dies without a word (the router drops all it sends, its FIN among them), so its peers'
/// connections to it look established until a write fails. When it returns, its peers push to
/// it on new connections at once: it has their state well within a `fetch_timeout` of 1 s,
/// which peers that waited for a write to fail and then `RECONNECT` (1 s) could never meet.
#[test]
fn an_lb_node_that_lost_its_state_comes_back_without_breaking_connections() {
    let mut lab = lab_with("vipsync-return", |spec| spec.sync_fetch_timeout = Some(1));
    let mut flows = Flows::open(&lab, 45);
    lab.set_drained(&[1], &[1, 2, 3]).expect("be1 draining");
    kill_and_converge(&mut lab, 1);
    let (_, _, failures) = flows.alive("lb1 dead");
    assert!(failures.is_empty(), "lost when lb1 died: {failures:?}");
    // lb1 returns with empty conntrack maps; it fetches its peers' exceptions before it
    // announces, and takes its share of the flows again.
    lab.revive_lb(1).expect("lb1 back");
    let back = Instant::now();
    while lab.router_next_hops(VIP4) < 3 || lab.router_next_hops(VIP6) < 3 {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "lb1 not announced"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let log = lab.agent_log("lb1");
    assert!(
        log.contains("every peer's flow state is here"),
        "lb1 announced without its peers' state: {log}"
    );
    let (_, _, failures) = flows.alive("lb1 back");
    assert!(failures.is_empty(), "lost when lb1 came back: {failures:?}");
    let status = lab.lb_cli(1, &["status"]).expect("status");
    assert!(
        !status.contains("sync: 0 entries applied"),
        "lb1 learned its peers' exceptions: {status}"
    );
    assert!(!status.contains("started without"), "{status}");
    // The peers hold lb1's new connection only: the one its previous life left them is
    // replaced, not kept until its silence runs out (its end would mark lb1 down).
    for peer in 2..=3 {
        assert_eq!(
            lab.sync_connections(1, peer).expect("ss"),
            1,
            "lb{peer}'s connections from lb1"
        );
        let status = lab.lb_cli(peer, &["status"]).expect("status");
        assert!(
            status.contains("sync peer 198.18.2.2: push up, receive up"),
            "lb{peer}: {status}"
        );
    }
}

#[test]
fn with_a_wrong_key_nothing_is_applied_and_the_tier_keeps_working() {
    let lab = lab("vipsync-key", false, Some(3));
    let mut flows = Flows::open(&lab, 20);
    drain_everywhere(&lab, 2);
    thread::sleep(Duration::from_secs(1));
    let status = lab.lb_cli(3, &["status"]).expect("status");
    assert!(status.contains("sync: 0 entries applied"), "{status}");
    assert!(
        status.contains("authentication"),
        "refusals counted: {status}"
    );
    // Nobody can have a state from a node of another key: each side started without it.
    let started_without = |status: &str, peer: &str| {
        status
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("sync peer {peer}:")))
            .is_some_and(|l| l.ends_with("started without its state"))
    };
    for peer in ["198.18.2.2", "198.18.3.2"] {
        assert!(started_without(&status, peer), "lb3 of {peer}: {status}");
    }
    for lb in 1..=2 {
        let status = lab.lb_cli(lb, &["status"]).expect("status");
        assert!(
            status.contains("sync peer 198.18.4.2: push down, receive down"),
            "lb{lb} and lb3 talk to each other: {status}"
        );
        assert!(started_without(&status, "198.18.4.2"), "lb{lb}: {status}");
    }
    // Forwarding goes on; flows that do not need another node's state keep working.
    let (tcp, udp, _) = flows.alive("after");
    assert_eq!((tcp, udp), (flows.tcp.len(), flows.udp.len()));
    assert_eq!(Flows::open(&lab, 5).tcp.len(), 10);
}

#[test]
fn a_node_without_sharing_gets_nothing_and_the_tier_keeps_working() {
    let lab = lab_with("vipsync-nokey", |spec| spec.sync_without = Some(3));
    let mut flows = Flows::open(&lab, 20);
    drain_everywhere(&lab, 2);
    thread::sleep(Duration::from_secs(1));
    for lb in 1..=2 {
        let status = lab.lb_cli(lb, &["status"]).expect("status");
        assert!(
            status.contains("sync peer 198.18.4.2: push down, receive down"),
            "lb{lb} reached a node without sharing: {status}"
        );
    }
    let status = lab.lb_cli(2, &["status"]).expect("status");
    assert!(
        status.contains("sync peer 198.18.2.2: push up, receive up"),
        "lb1 and lb2 share: {status}"
    );
    let status = lab.lb_cli(3, &["status"]).expect("status");
    assert!(!status.contains("sync"), "{status}");
    let (tcp, udp, _) = flows.alive("after");
    assert_eq!((tcp, udp), (flows.tcp.len(), flows.udp.len()));
}
