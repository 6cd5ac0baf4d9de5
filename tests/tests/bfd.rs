//! vip-agent's BFD against BIRD's (`protocol bfd`, `bfd on` on the BGP neighbour), in network
//! namespaces (the peering lab: router `rt`, LB node `lb1` with the XDP program attached to its
//! uplink, so every BFD packet crosses it).

use std::{
    thread,
    time::{Duration, Instant},
};

use vip_agent::control::{BfdStatus, Response};
use vip_tests::{
    node::{Agent, Netns},
    peering::{VIP4, VIP6, bird_config, established, lb_config, topology},
    router::Bird,
};

/// The agent's BFD settings: on for the peer, `interval` ms both ways, multiplier 3.
fn agent_bfd(interval: u64) -> String {
    format!("bfd = true\nbfd_min_tx = {interval}\nbfd_min_rx = {interval}\nbfd_multiplier = 3\n")
}

/// BIRD with BFD at `interval` ms x 3 on its links and `bfd on` on the BGP neighbours; a hold
/// time of 9 s, so only BFD can take a session down quickly.
fn bird_bfd(lbs: usize, interval: u64) -> String {
    bird_config(lbs, None).replace("hold time 3;", "hold time 9; bfd on;")
        + &format!(
            "protocol bfd {{ interface \"r*\" {{ min rx interval {interval} ms; \
             min tx interval {interval} ms; multiplier 3; }}; }}\n"
        )
}

fn bird_bfd_up(bird: &Bird) -> bool {
    bird.cli("show bfd sessions")
        .lines()
        .any(|l| l.contains("198.18.1.2") && l.contains("Up"))
}

/// `vip-agent status -o json`'s BFD session with the router.
fn agent_bfd_status(lb: &Netns) -> BfdStatus {
    let pins = lb.pin_dir.to_string_lossy().into_owned();
    let json = lb.agent_cli(&["status", "--pin-dir", &pins, "-o", "json"]);
    let whole: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let status: Response =
        serde_json::from_value(whole["agent"]["Ok"].clone()).expect("the agent's status");
    match status {
        Response::Status(mut s) => s.peers.remove(0).bfd.expect("a BFD session"),
        _ => panic!("not a status: {json}"),
    }
}

/// Makes the LB node vanish for the router: every frame on the router's side of its link is
/// dropped (carrier stays up, so the router keeps its next hop and only BFD or the hold time
/// can tell). Undone when dropped.
struct Cut {
    _links: Vec<std::os::fd::OwnedFd>,
}

impl Cut {
    fn router_side(rt: &Netns, dev: &str) -> Self {
        let dev = dev.to_owned();
        let links = rt.within(move || vip_tests::tc::drop_all(&dev).expect("tc drop program"));
        Cut { _links: links }
    }
}

/// The agent's config with BFD at 100 ms and one VIP.
fn standard(lb: &Netns) -> String {
    lb_config(lb, 1, &agent_bfd(100), &[VIP4])
}

/// The peering lab with BIRD (`bird_conf`) and the agent (its config made for the LB node's
/// namespace), up: the route at the router and BIRD's BFD session at 100 ms.
fn up_at_100ms(
    bird_conf: &str,
    agent_conf: impl FnOnce(&Netns) -> String,
) -> (Netns, Vec<Netns>, Bird, Agent) {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, bird_conf);
    let agent = Agent::start(&lbs[0], &agent_conf(&lbs[0]), &[]);
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route");
    bird.wait_for(
        |b| b.cli("show bfd sessions").contains("0.100"),
        "BFD at 100 ms",
    );
    (rt, lbs, bird, agent)
}

#[test]
fn bfd_comes_up_with_bird_before_bgp_and_shows_in_status_and_metrics() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &bird_bfd(1, 100));
    let _agent = Agent::start(
        &lbs[0],
        &lb_config(&lbs[0], 1, &agent_bfd(100), &[VIP4]),
        &[],
    );
    bird.wait_for(bird_bfd_up, "BIRD's BFD session Up");
    bird.wait_for(|b| established(b, "lb1"), "the BGP session");
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route");
    // Both sides at the configured rate once the Poll Sequences are done.
    let deadline = Instant::now() + Duration::from_secs(5);
    let bfd = loop {
        let bfd = agent_bfd_status(&lbs[0]);
        if bfd.tx_interval_us == 100_000 || Instant::now() > deadline {
            break bfd;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(bfd.state, "Up", "{bfd:?}");
    assert_eq!(bfd.remote_state, "Up", "{bfd:?}");
    assert_eq!(bfd.tx_interval_us, 100_000, "{bfd:?}");
    assert_eq!(bfd.detection_time_us, 300_000, "{bfd:?}");
    assert_ne!(bfd.remote_discriminator, 0, "{bfd:?}");
    assert_eq!(bfd.flaps, 0, "{bfd:?}");
    let m = lbs[0].metrics();
    assert!(
        m.contains("vip_bfd_session_up{peer=\"198.18.1.1\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("vip_bfd_detection_time_seconds{peer=\"198.18.1.1\"} 0.3"),
        "{m}"
    );
    // BIRD agrees on the intervals.
    let sessions = bird.cli("show bfd sessions");
    assert!(sessions.contains("0.100"), "{sessions}");
}

#[test]
fn bgp_waits_for_bfd_when_the_router_runs_none() {
    let (rt, lbs) = topology(1);
    // BIRD without BFD: the agent's BFD never comes up, so neither does its BGP session.
    let bird = Bird::start(&rt, &bird_config(1, None));
    let _agent = Agent::start(
        &lbs[0],
        &lb_config(&lbs[0], 1, &agent_bfd(100), &[VIP4]),
        &[],
    );
    thread::sleep(Duration::from_secs(4));
    assert!(
        !established(&bird, "lb1"),
        "{}",
        bird.cli("show protocols lb1")
    );
    let bfd = agent_bfd_status(&lbs[0]);
    assert_eq!(bfd.state, "Down", "{bfd:?}");
    let pins = lbs[0].pin_dir.to_string_lossy().into_owned();
    let status = lbs[0].agent_cli(&["status", "--pin-dir", &pins]);
    assert!(status.contains("bgp peer 198.18.1.1: Idle"), "{status}");
}

#[test]
fn a_dead_lb_node_is_dropped_within_the_detection_time() {
    let (rt, _lbs, bird, mut agent) = up_at_100ms(&bird_bfd(1, 100), standard);
    let _cut = Cut::router_side(&rt, "r1");
    let cut = Instant::now();
    agent.kill();
    bird.wait_for(|b| !b.cli("show route").contains(VIP4), "the route gone");
    let took = cut.elapsed();
    eprintln!("route gone {took:?} after the cut");
    // 300 ms detection; the hold time (9 s) would take thirty times as long. The margin is
    // for BIRD's CLI polling on a shared machine.
    assert!(took < Duration::from_secs(3), "route removal took {took:?}");
    assert!(
        bird.cli("show protocols all lb1")
            .contains("BFD session down"),
        "{}",
        bird.cli("show protocols all lb1")
    );
}

#[test]
fn a_timer_change_by_reload_is_negotiated_without_a_flap() {
    let (_rt, lbs, bird, mut agent) = up_at_100ms(&bird_bfd(1, 100), standard);
    agent.rewrite_config(&lb_config(&lbs[0], 1, &agent_bfd(400), &[VIP4]));
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reloaded", 1);
    // BIRD sends at the slower of its rate and our Required Min RX: 400 ms now.
    bird.wait_for(
        |b| b.cli("show bfd sessions").contains("0.400"),
        "BIRD at 400 ms",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent_bfd_status(&lbs[0]).tx_interval_us != 400_000 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let bfd = agent_bfd_status(&lbs[0]);
    assert_eq!(bfd.tx_interval_us, 400_000, "{bfd:?}");
    assert_eq!(bfd.detection_time_us, 1_200_000, "{bfd:?}");
    assert_eq!(bfd.flaps, 0, "{bfd:?}");
    assert!(established(&bird, "lb1"));
    assert_eq!(
        agent.log_text().matches("BGP session established").count(),
        1
    );
}

#[test]
fn bird_restarted_takes_bgp_down_with_bfd_and_both_come_back() {
    let (rt, lbs) = topology(1);
    let mut bird = Bird::start(&rt, &bird_bfd(1, 100));
    let mut agent = Agent::start(
        &lbs[0],
        &lb_config(&lbs[0], 1, &agent_bfd(100), &[VIP4]),
        &[],
    );
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route");
    bird.stop();
    agent.wait_for_log("BFD session down", 1);
    let bird = Bird::start(&rt, &bird_bfd(1, 100));
    bird.wait_for(bird_bfd_up, "BFD Up again");
    bird.wait_for(
        |b| b.cli("show route").contains(VIP4),
        "the route after the router restarted",
    );
    let bfd = agent_bfd_status(&lbs[0]);
    assert_eq!(bfd.state, "Up", "{bfd:?}");
    assert_eq!(bfd.flaps, 1, "{bfd:?}");
}

/// Packets from the router's address that are no valid BFD for this session: each refused and
/// counted by reason, the agent up, the real session undisturbed.
#[test]
fn malformed_and_off_link_bfd_packets_are_refused_and_counted() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &bird_bfd(1, 100));
    let mut agent = Agent::start(
        &lbs[0],
        &lb_config(&lbs[0], 1, &agent_bfd(100), &[VIP4]),
        &[],
    );
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route");
    let valid = vip_agent::bfd::packet::encode(&vip_agent::bfd::packet::Control {
        diag: vip_agent::bfd::packet::Diag::None,
        state: vip_agent::bfd::packet::State::Down,
        poll: false,
        final_: false,
        detect_mult: 3,
        my_discriminator: 12345,
        your_discriminator: 0,
        desired_min_tx_us: 1_000_000,
        required_min_rx_us: 1_000_000,
    });
    let mut authenticated = valid;
    authenticated[1] |= 0x04;
    let mut version_2 = valid;
    version_2[0] = 0x40;
    let mut stranger = valid;
    stranger[8..12].copy_from_slice(&7u32.to_be_bytes());
    let sent: Vec<(Vec<u8>, u32)> = vec![
        (valid[..10].to_vec(), 255),
        (version_2.to_vec(), 255),
        (authenticated.to_vec(), 255),
        (stranger.to_vec(), 255),
        // Off link (TTL below 255): refused before it is read.
        (valid.to_vec(), 64),
    ];
    rt.within(move || {
        for (bytes, ttl) in sent {
            for _ in 0..10 {
                let s = std::net::UdpSocket::bind("198.18.1.1:0").unwrap();
                s.set_ttl(ttl).unwrap();
                s.send_to(&bytes, ("198.18.1.2", vip_agent::bfd::PORT))
                    .unwrap();
            }
        }
    });
    thread::sleep(Duration::from_millis(500));
    let m = lbs[0].metrics();
    for reason in [
        "length",
        "version",
        "authentication",
        "unknown_session",
        "ttl",
    ] {
        assert!(
            m.contains(&format!(
                "vip_bfd_packets_refused_total{{reason=\"{reason}\"}} 10"
            )),
            "{reason}: {m}"
        );
    }
    assert!(agent.running());
    let bfd = agent_bfd_status(&lbs[0]);
    assert_eq!((bfd.state.as_str(), bfd.flaps), ("Up", 0), "{bfd:?}");
    assert!(established(&bird, "lb1"));
}

#[test]
fn bfd_over_ipv6_carries_an_ipv6_bgp_session() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(
        &rt,
        &bird_bfd(1, 100).replace(
            "local 198.18.1.1 as 65000; neighbor 198.18.1.2",
            "local fd00:18:1::1 as 65000; neighbor fd00:18:1::2",
        ),
    );
    let _agent = Agent::start(
        &lbs[0],
        &lb_config(&lbs[0], 1, &agent_bfd(100), &[VIP6])
            .replace("address = \"198.18.1.1\"", "address = \"fd00:18:1::1\""),
        &[],
    );
    bird.wait_for(
        |b| {
            b.cli("show bfd sessions")
                .lines()
                .any(|l| l.contains("fd00:18:1::2") && l.contains("Up"))
        },
        "BIRD's BFD session over IPv6 Up",
    );
    bird.wait_for(|b| b.cli("show route").contains(VIP6), "the IPv6 route");
    let bfd = agent_bfd_status(&lbs[0]);
    assert_eq!(bfd.state, "Up", "{bfd:?}");
}

/// The router dies (its side of the link drops everything): the agent's BGP session goes
/// down within the detection time, not after the 9 s hold time.
#[test]
fn a_dead_router_takes_the_bgp_session_down_within_the_detection_time() {
    let (rt, lbs, _bird, mut agent) = up_at_100ms(&bird_bfd(1, 100), |lb| {
        standard(lb).replace("hold_time = 3", "hold_time = 9")
    });
    let _cut = Cut::router_side(&rt, "r1");
    let cut = Instant::now();
    agent.wait_for_log("BGP session down", 1);
    let took = cut.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "BGP went down after {took:?}"
    );
    let log = agent.log_text();
    assert!(log.contains("BFD session down"), "{log}");
    let bfd = agent_bfd_status(&lbs[0]);
    assert_eq!(bfd.diag, "ControlDetectionTimeExpired", "{bfd:?}");
}

/// A planned restart (SIGUSR2) with graceful restart and BFD: the agent's BFD session ends
/// (with AdminDown) together with its BGP session. A router that treats BFD down as the start
/// of a graceful restart (BIRD: `bfd graceful`) keeps the route, stale, until the next agent is
/// back and BFD and BGP come up again; with plain `bfd on`, BIRD 2.0 drops it at once.
#[test]
fn a_restart_with_graceful_restart_keeps_the_route_where_bfd_down_is_graceful() {
    let with_restart = |lb: &Netns| {
        lb_config(
            lb,
            1,
            &(agent_bfd(100) + "graceful_restart_time = 30\n"),
            &[VIP4],
        )
    };
    let (_rt, lbs, bird, mut agent) = up_at_100ms(
        &bird_bfd(1, 100).replace("bfd on;", "bfd graceful; graceful restart on;"),
        with_restart,
    );
    let config = with_restart(&lbs[0]);
    agent.signal(libc::SIGUSR2);
    assert_eq!(agent.exit_status().code(), Some(75), "{}", agent.log_text());
    thread::sleep(Duration::from_secs(2));
    assert!(
        bird.cli("show route").contains(VIP4),
        "route dropped on a restart: {}",
        bird.cli("show protocols all lb1")
    );
    let _again = Agent::start(&lbs[0], &config, &[]);
    bird.wait_for(bird_bfd_up, "BFD Up again");
    bird.wait_for(|b| established(b, "lb1"), "the session again");
    assert!(bird.cli("show route").contains(VIP4));
}

/// The BIRD blocks of docs/operations.md (BGP, then BFD), run as written with the lab's
/// addresses: the session comes up with BFD, the VIP is installed in the router's kernel.
#[test]
fn the_bird_examples_of_the_operations_guide_work() {
    let lab = |text: String| {
        text.replace("192.0.2.10", "198.18.1.2")
            .replace("192.0.2.1", "198.18.1.1")
            .replace("198.51.100.0/24", "198.19.0.0/24")
            .replace("2001:db8:100::/48", "fd00:19::/48")
            .replace("\"eth*\"", "\"r*\"")
    };
    let bgp = lab(vip_tests::peering::operations_guide_block(
        "router id 192.0.2.1;",
    ));
    let bfd = lab(vip_tests::peering::operations_guide_block("protocol bfd {"));
    // The BFD block's `protocol bgp lb1` replaces the plain one.
    let plain = &bgp[bgp.find("protocol bgp lb1").expect("the BGP protocol")..];
    let config = bgp.replace(plain, "") + &bfd;
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &config);
    let _agent = Agent::start(
        &lbs[0],
        &lb_config(&lbs[0], 1, &agent_bfd(100), &[VIP4]),
        &[],
    );
    bird.wait_for(bird_bfd_up, "BFD Up");
    bird.wait_for(|b| established(b, "lb1"), "the session");
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the VIP");
    let kernel = rt.ip(&["route", "show", &format!("{VIP4}/32")]);
    assert!(kernel.contains("198.18.1.2"), "{kernel}");
}

/// BFD's port held by another daemon (say FRR's bfdd) fails start-up before anything on the
/// node changed: no program attached, no pins, no VIP on `lo`.
#[test]
fn a_taken_bfd_port_fails_start_up_before_the_node_changes() {
    let (_rt, lbs) = topology(1);
    let _bfdd = lbs[0]
        .within(|| std::net::UdpSocket::bind(("::", vip_agent::bfd::PORT)).expect("bind 3784"));
    let mut agent = Agent::start(&lbs[0], &standard(&lbs[0]), &[]);
    assert!(!agent.wait(), "the agent started: {}", agent.log_text());
    let log = agent.log_text();
    assert!(log.contains("BFD's UDP port 3784"), "{log}");
    assert!(!lbs[0].pin_dir.exists(), "pins were made");
    assert!(!lbs[0].ip(&["link", "show", "up0"]).contains("xdp"));
    assert!(!lbs[0].ip(&["addr", "show", "dev", "lo"]).contains(VIP4));
}
