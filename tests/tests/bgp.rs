//! vip-agent's BGP speaker against real BIRD 2 and GoBGP routers, in network namespaces:
//!
//! ```text
//!   ns rt (router: BIRD or GoBGP, AS 65000) ── r1 ── up0 ── ns lb1 (vip-agent, AS 65001)
//!                                           └─ r2 ── up0 ── ns lb2 (vip-agent, AS 65001)  (ECMP)
//! ```

use std::{thread, time::Duration};

use vip_tests::{
    node::Agent,
    peering::{VIP4, VIP6, bird_config, established, lb_config, operations_guide_block, topology},
    router::{Bird, Frr, GoBgp},
};

#[test]
fn announces_to_bird_and_withdraws() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &bird_config(1, None));
    let mut agent = Agent::start(&lbs[0], &lb_config(&lbs[0], 1, "", &[VIP4, VIP6]), &[]);
    bird.wait_for(|b| established(b, "lb1"), "the session");
    bird.wait_for(|b| b.cli("show route all").contains(VIP6), "both routes");

    let v4 = bird.cli(&format!("show route {VIP4}/32 all"));
    assert!(v4.contains("via 198.18.1.2"), "{v4}");
    // An AS_SEQUENCE prints as a plain number; an AS_SET would print as {65001}.
    assert!(v4.contains("BGP.as_path: 65001\n"), "{v4}");
    assert!(v4.contains("BGP.community: (65001,100)"), "{v4}");
    assert!(v4.contains("BGP.large_community: (65001, 7, 8)"), "{v4}");
    assert!(v4.contains("BGP.origin: IGP"), "{v4}");
    let v6 = bird.cli(&format!("show route {VIP6}/128 all"));
    assert!(v6.contains("via fd00:18:1::2"), "{v6}");
    assert!(v6.contains("BGP.as_path: 65001\n"), "{v6}");
    // Installed in the router's kernel table.
    assert!(
        rt.ip(&["route", "show", &format!("{VIP4}/32")])
            .contains("198.18.1.2")
    );
    // The session is in the agent's metrics, and `status` shows it and the attachment.
    let metrics = lbs[0].metrics();
    assert!(
        metrics.contains("vip_bgp_session_established{peer=\"198.18.1.1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vip_bgp_routes_announced{peer=\"198.18.1.1\"} 2"),
        "{metrics}"
    );
    // Both routes (different next hops: two UPDATEs) and End-of-RIB for each family.
    assert!(
        metrics.contains("vip_bgp_updates_sent_total{peer=\"198.18.1.1\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vip_bgp_notifications_sent_total{peer=\"198.18.1.1\"} 0"),
        "{metrics}"
    );
    let pin = lbs[0].pin_dir.to_string_lossy().into_owned();
    let agent_bin = vip_tests::node::agent_bin().to_string_lossy().into_owned();
    let socket = lbs[0].control_socket();
    // From this network namespace but the host's mount namespace (where the pins are).
    let status = lbs[0].within(move || {
        let out = std::process::Command::new(&agent_bin)
            .arg("--socket")
            .arg(&socket)
            .args(["status", "--pin-dir", &pin])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    assert!(
        status.contains("bgp peer 198.18.1.1: Established, 2 routes announced"),
        "{status}"
    );
    assert!(status.contains("attached up0: driver mode"), "{status}");

    // Removing a VIP from the config and reloading withdraws it.
    agent.rewrite_config(&lb_config(&lbs[0], 1, "", &[VIP4]));
    agent.signal(libc::SIGHUP);
    bird.wait_for(
        |b| !b.cli("show route").contains(VIP6),
        "the IPv6 VIP withdrawn",
    );
    assert!(bird.cli("show route").contains(VIP4));

    // Killed without graceful restart: the router drops the routes after the hold time.
    agent.kill();
    bird.wait_for(
        |b| !b.cli("show route").contains(VIP4),
        "routes gone after the hold time",
    );
}

/// A reload that removes a VIP withdraws it while the node still forwards it: first with
/// GRACEFUL_SHUTDOWN for the drain time (the VIP still in the maps), then the withdrawal, and
/// only then does the VIP leave the maps.
#[test]
fn a_reload_withdraws_a_removed_vip_before_it_leaves_the_maps() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &bird_config(1, None));
    let mut agent = Agent::start(
        &lbs[0],
        &lb_config(&lbs[0], 1, "drain_time = 2\n", &[VIP4, VIP6]),
        &["--cleanup"],
    );
    bird.wait_for(|b| b.cli("show route").contains(VIP6), "both routes");
    let pinned_v6 = || {
        let options =
            vip_agent::dataplane::DataplaneOptions::from_pins(&lbs[0].pin_dir).expect("pins");
        vip_agent::dataplane::Dataplane::load(options)
            .expect("open the pinned maps")
            .vips()
            .expect("VIPS")
            .iter()
            .any(|(k, _)| k.family == 6)
    };
    assert!(pinned_v6());

    agent.rewrite_config(&lb_config(&lbs[0], 1, "drain_time = 2\n", &[VIP4]));
    agent.signal(libc::SIGHUP);
    bird.wait_for(
        |b| {
            b.cli(&format!("show route {VIP6}/128 all"))
                .contains("(65535,0)")
        },
        "GRACEFUL_SHUTDOWN on the leaving route",
    );
    assert!(pinned_v6(), "the VIP left the maps while still announced");
    assert!(
        !bird
            .cli(&format!("show route {VIP4}/32 all"))
            .contains("(65535,0)"),
        "the staying route is not drained"
    );
    bird.wait_for(|b| !b.cli("show route").contains(VIP6), "the withdrawal");
    agent.wait_for_log("reloaded", 1);
    assert!(!pinned_v6(), "the VIP stayed in the maps");
    assert!(bird.cli("show route").contains(VIP4));
}

#[test]
fn drain_announces_graceful_shutdown_then_withdraws() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &bird_config(1, None));
    let mut agent = Agent::start(
        &lbs[0],
        &lb_config(&lbs[0], 1, "drain_time = 2\n", &[VIP4]),
        &["--cleanup"],
    );
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route");
    agent.signal(libc::SIGTERM);
    bird.wait_for(
        |b| {
            b.cli(&format!("show route {VIP4}/32 all"))
                .contains("(65535,0)")
        },
        "GRACEFUL_SHUTDOWN on the route",
    );
    bird.wait_for(|b| !b.cli("show route").contains(VIP4), "the withdrawal");
    assert!(agent.wait(), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(log.contains("draining"), "{log}");
}

#[test]
fn md5_password_must_match() {
    let (rt, lbs) = topology(2);
    let bird = Bird::start(&rt, &bird_config(2, Some("s3cret")));
    let right = lb_config(&lbs[0], 1, "", &[VIP4])
        .replace("asn = 65000\n", "asn = 65000\npassword = \"s3cret\"\n");
    let wrong = lb_config(&lbs[1], 2, "", &[VIP4])
        .replace("asn = 65000\n", "asn = 65000\npassword = \"guess\"\n");
    let _a = Agent::start(&lbs[0], &right, &[]);
    let _b = Agent::start(&lbs[1], &wrong, &[]);
    bird.wait_for(
        |b| established(b, "lb1"),
        "the session with the right password",
    );
    thread::sleep(Duration::from_secs(3));
    assert!(
        !established(&bird, "lb2"),
        "a wrong MD5 password established a session"
    );
}

#[test]
fn two_lb_nodes_give_an_ecmp_route() {
    let (rt, lbs) = topology(2);
    let bird = Bird::start(&rt, &bird_config(2, None));
    let _a = Agent::start(&lbs[0], &lb_config(&lbs[0], 1, "", &[VIP4]), &[]);
    let mut b = Agent::start(&lbs[1], &lb_config(&lbs[1], 2, "", &[VIP4]), &[]);
    let route = || rt.ip(&["route", "show", &format!("{VIP4}/32")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(route().contains("198.18.1.2") && route().contains("198.18.2.2")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no ECMP route: {}",
            route()
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(route().matches("nexthop via").count(), 2, "{}", route());
    // One LB node gone: one next hop left.
    b.kill();
    bird.wait_for(
        |_| route().matches("198.18.").count() == 1,
        "one next hop left",
    );
    assert!(route().contains("198.18.1.2"), "{}", route());
}

#[test]
fn announces_to_gobgp() {
    let (rt, lbs) = topology(1);
    // The operations guide's block, with the lab's addresses and short timers.
    let config = operations_guide_block("[global.config]")
        .replace("192.0.2.10", "198.18.1.2")
        .replace("192.0.2.1", "198.18.1.1")
        + "  [neighbors.timers.config]\n    hold-time = 3\n    connect-retry = 1\n";
    let gobgp = GoBgp::start(&rt, &config);
    let _agent = Agent::start(&lbs[0], &lb_config(&lbs[0], 1, "", &[VIP4, VIP6]), &[]);
    gobgp.wait_for(
        |g| g.cli("global rib -a ipv6").contains(VIP6),
        "the IPv6 route",
    );
    let v4 = gobgp.cli("global rib -a ipv4");
    assert!(
        v4.contains(&format!("{VIP4}/32")) && v4.contains("198.18.1.2"),
        "{v4}"
    );
    // The AS path column: a sequence prints as "65001", a set would print as "{65001}".
    assert!(v4.contains(" 65001 ") && !v4.contains("{65001}"), "{v4}");
    let detail = gobgp.cli(&format!("global rib -a ipv4 {VIP4}/32"));
    assert!(detail.contains("65001:100"), "{detail}");
    let v6 = gobgp.cli("global rib -a ipv6");
    assert!(v6.contains("fd00:18:1::2"), "{v6}");
}

/// Waits until FRR has both VIPs, IPv4 and IPv6.
fn wait_for_both_vips(frr: &Frr) {
    for (family, prefix) in [
        ("ipv4", format!("{VIP4}/32")),
        ("ipv6", format!("{VIP6}/128")),
    ] {
        frr.wait_for(
            |f| {
                f.cli(&format!("show bgp {family} unicast"))
                    .contains(&prefix)
            },
            &format!("{prefix} at FRR"),
        );
    }
}

/// FRR sends the hostname capability by default, here with a domain name: the session comes up
/// and both VIPs arrive (IPv6 over the IPv4 session).
#[test]
fn announces_to_frr_which_sends_its_host_and_domain_name() {
    let (rt, lbs) = topology(1);
    let frr = Frr::start(
        &rt,
        "hostname rt\ndomainname lab.example\nrouter bgp 65000\n bgp router-id 198.18.1.1\n\
         no bgp ebgp-requires-policy\n neighbor 198.18.1.2 remote-as 65001\n\
         neighbor 198.18.1.2 timers 1 3\n neighbor 198.18.1.2 timers connect 1\n\
         address-family ipv4 unicast\n  neighbor 198.18.1.2 activate\n exit-address-family\n\
         address-family ipv6 unicast\n  neighbor 198.18.1.2 activate\n exit-address-family\n",
    );
    let agent = Agent::start(&lbs[0], &lb_config(&lbs[0], 1, "", &[VIP4, VIP6]), &[]);
    wait_for_both_vips(&frr);
    let neighbor = frr.cli("show bgp neighbors 198.18.1.2");
    assert!(
        neighbor.contains("Hostname Capability: advertised"),
        "{neighbor}"
    );
    assert!(
        !agent.log_text().contains("NOTIFICATION"),
        "{}",
        agent.log_text()
    );
}

/// The FRR block of docs/operations.md, run as written (the documentation's addresses swapped
/// for the lab's): both VIPs are accepted.
#[test]
fn the_frr_example_of_the_operations_guide_accepts_the_vips() {
    let config = operations_guide_block("ip prefix-list VIPS")
        .replace("192.0.2.10", "198.18.1.2")
        .replace("192.0.2.1", "198.18.1.1")
        .replace("198.51.100.0/24", "198.19.0.0/24")
        .replace("2001:db8:100::/48", "fd00:19::/48")
        .replace(
            "timers 3 9",
            "timers 1 3\n neighbor 198.18.1.2 timers connect 1",
        );
    let (rt, lbs) = topology(1);
    let frr = Frr::start(&rt, &config);
    let _agent = Agent::start(&lbs[0], &lb_config(&lbs[0], 1, "", &[VIP4, VIP6]), &[]);
    wait_for_both_vips(&frr);
}

/// A router's OPEN with capabilities vip does not use (hostname with a domain name, an unknown
/// code) establishes; a ROUTE-REFRESH for a family the router did not negotiate is ignored,
/// one for IPv4 unicast is answered with the routes.
#[test]
fn unknown_capabilities_are_skipped_and_route_refresh_needs_a_negotiated_family() {
    use std::io::Write;
    use vip_agent::bgp::wire::{self, Message};

    let (rt, lbs) = topology(1);
    let listener = rt.within(|| std::net::TcpListener::bind("198.18.1.1:179").expect("bind 179"));
    let agent = Agent::start(&lbs[0], &lb_config(&lbs[0], 1, "", &[VIP4]), &[]);
    let mut s = scripted::accept(&listener);
    assert!(matches!(scripted::read(&mut s), Some(Message::Open(_))));
    // AS 65000, hold 9, 198.18.1.1; IPv4 unicast only, route refresh, 4-octet AS, hostname
    // "rt" in "lab.example", and capability 200 with a value vip has never heard of.
    let mut caps = vec![1, 4, 0, 1, 0, 1, 2, 0, 65, 4, 0, 0, 0xfd, 0xe8];
    caps.extend_from_slice(&[73, 15, 2, b'r', b't', 11]);
    caps.extend_from_slice(b"lab.example");
    caps.extend_from_slice(&[200, 3, 1, 2, 3]);
    let mut body = vec![4, 0xfd, 0xe8, 0, 9, 198, 18, 1, 1, caps.len() as u8 + 2, 2];
    body.push(caps.len() as u8);
    body.extend_from_slice(&caps);
    let mut open = vec![0xff; 16];
    open.extend_from_slice(&((wire::HEADER_LEN + body.len()) as u16).to_be_bytes());
    open.push(wire::OPEN);
    open.extend_from_slice(&body);
    s.write_all(&open).unwrap();
    s.write_all(&wire::encode_keepalive()).unwrap();
    // Established: the routes, End-of-RIB, keepalives.
    let updates_within = |s: &mut std::net::TcpStream, within: Duration| {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = std::time::Instant::now() + within;
        let mut updates = 0;
        while std::time::Instant::now() < deadline {
            match scripted::read(s) {
                Some(Message::Update) => updates += 1,
                Some(Message::Notification(n)) => panic!("the agent sent {n}"),
                _ => {}
            }
        }
        updates
    };
    assert!(
        updates_within(&mut s, Duration::from_secs(2)) > 0,
        "{}",
        agent.log_text()
    );
    let refresh = |afi: u16, safi: u8| {
        let mut m = vec![0xff; 16];
        m.extend_from_slice(&[0, 23, wire::ROUTE_REFRESH]);
        m.extend_from_slice(&afi.to_be_bytes());
        m.extend_from_slice(&[0, safi]);
        m
    };
    // IPv6 unicast was not negotiated (the router offered IPv4 only).
    s.write_all(&refresh(2, 1)).unwrap();
    assert_eq!(updates_within(&mut s, Duration::from_secs(2)), 0);
    s.write_all(&refresh(1, 1)).unwrap();
    assert!(updates_within(&mut s, Duration::from_secs(2)) > 0);
}

/// 1,000 connections from an address that is no peer, while a real peer's session runs: the
/// session stays up, the refusals are logged a few times rather than a thousand, and the
/// session re-establishes within seconds after the router resets it.
#[test]
fn a_connection_flood_leaves_the_peers_session_alone() {
    let (rt, lbs) = topology(1);
    rt.ip(&["addr", "add", "198.18.1.9/24", "dev", "r1"]);
    let bird = Bird::start(&rt, &bird_config(1, None));
    let agent = Agent::start(
        &lbs[0],
        &lb_config(&lbs[0], 1, "listen = true\n", &[VIP4]),
        &[],
    );
    bird.wait_for(|b| established(b, "lb1"), "the session");
    let started = std::time::Instant::now();
    let flood = rt.within(|| {
        let mut held = Vec::new();
        for _ in 0..1_000 {
            if let Ok(c) = socket2_connect("198.18.1.9", "198.18.1.2:179") {
                held.push(c);
            }
        }
        held.len()
    });
    // A short accept queue makes connections wait for SYN retries (36 s for 1,000 once).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the flood took {:?}",
        started.elapsed()
    );
    assert!(flood > 900, "only {flood} connections were accepted");
    assert!(established(&bird, "lb1"));
    let refusals = agent_log_count(&agent, "unconfigured addresses refused");
    assert!(
        (1..=5).contains(&refusals),
        "{refusals} log lines for the flood: {}",
        agent.log_text()
    );
    bird.cli("restart lb1");
    let reset = std::time::Instant::now();
    bird.wait_for(|b| established(b, "lb1"), "the session again");
    assert!(
        reset.elapsed() < Duration::from_secs(10),
        "{:?}",
        reset.elapsed()
    );
}

#[test]
fn router_restart_makes_the_agent_reconnect_and_reannounce() {
    let (rt, lbs) = topology(1);
    let mut bird = Bird::start(&rt, &bird_config(1, None));
    let _agent = Agent::start(&lbs[0], &lb_config(&lbs[0], 1, "", &[VIP4]), &[]);
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route");
    // An operator disables the session at the router (Cease / administrative shutdown).
    bird.cli("disable lb1");
    bird.wait_for(|b| !b.cli("show route").contains(VIP4), "the route gone");
    bird.cli("enable lb1");
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route again");
    let metrics = lbs[0].metrics();
    for counted in [
        "vip_bgp_session_flaps_total{peer=\"198.18.1.1\"} 1",
        "vip_bgp_notifications_received_total{peer=\"198.18.1.1\"} 1",
    ] {
        assert!(metrics.contains(counted), "{counted}: {metrics}");
    }
    // The router dies and comes back: no NOTIFICATION, one more flap.
    bird.stop();
    let bird = Bird::start(&rt, &bird_config(1, None));
    bird.wait_for(
        |b| b.cli("show route").contains(VIP4),
        "the route after the router restarted",
    );
    let metrics = lbs[0].metrics();
    assert!(
        metrics.contains("vip_bgp_session_flaps_total{peer=\"198.18.1.1\"} 2"),
        "{metrics}"
    );
}

#[test]
fn graceful_restart_keeps_routes_while_the_agent_restarts() {
    let (rt, lbs) = topology(1);
    let config = bird_config(1, None).replace("hold time 3;", "hold time 3; graceful restart on;");
    let bird = Bird::start(&rt, &config);
    let lb_conf = lb_config(&lbs[0], 1, "graceful_restart_time = 30\n", &[VIP4]);
    let mut agent = Agent::start(&lbs[0], &lb_conf, &[]);
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route");
    // SIGKILL: no Cease. The router keeps the routes, stale, past the hold time.
    agent.kill();
    thread::sleep(Duration::from_secs(5));
    let route = bird.cli(&format!("show route {VIP4}/32 all"));
    assert!(
        route.contains(VIP4),
        "route dropped despite graceful restart: {route}"
    );
    // Kept as stale, for the restart time.
    let protocol = bird.cli("show protocols all lb1");
    assert!(
        protocol.contains("Neighbor graceful restart active") && protocol.contains("Restart timer"),
        "{protocol}"
    );
    // The pinned datapath still forwards; a new agent takes over and refreshes the routes.
    assert!(lbs[0].pin_dir.join("links/xdp_up0").exists());
    assert!(lbs[0].ip(&["link", "show", "up0"]).contains("xdp"));
    let mut again = Agent::start(&lbs[0], &lb_conf, &[]);
    again.wait_for_log("took over pinned state", 1);
    bird.wait_for(|b| established(b, "lb1"), "the session again");
    assert!(bird.cli("show route").contains(VIP4));
}

/// A planned restart (SIGUSR2) closes the session as a restarting speaker: BIRD keeps the
/// route, stale, while the pinned datapath forwards, and the next agent refreshes it. A stop
/// (SIGTERM) withdraws at once, graceful restart or not.
#[test]
fn a_restart_keeps_routes_with_graceful_restart_and_a_stop_withdraws_them() {
    let (rt, lbs) = topology(1);
    let config = bird_config(1, None).replace("hold time 3;", "hold time 3; graceful restart on;");
    let bird = Bird::start(&rt, &config);
    let lb_conf = lb_config(&lbs[0], 1, "graceful_restart_time = 30\n", &[VIP4]);
    let mut agent = Agent::start(&lbs[0], &lb_conf, &[]);
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route");
    agent.signal(libc::SIGUSR2);
    assert_eq!(agent.exit_status().code(), Some(75), "{}", agent.log_text());
    // Past the hold time: kept, stale, for the restart time.
    thread::sleep(Duration::from_secs(4));
    assert!(
        bird.cli("show route").contains(VIP4),
        "route dropped on a restart"
    );
    let protocol = bird.cli("show protocols all lb1");
    assert!(
        protocol.contains("Neighbor graceful restart active"),
        "{protocol}"
    );
    assert!(lbs[0].ip(&["link", "show", "up0"]).contains("xdp"));
    let mut again = Agent::start(&lbs[0], &lb_conf, &[]);
    bird.wait_for(|b| established(b, "lb1"), "the session again");
    assert!(bird.cli("show route").contains(VIP4));
    // A stop withdraws at once, long before the restart time would end.
    again.signal(libc::SIGTERM);
    let stopped = std::time::Instant::now();
    bird.wait_for(|b| !b.cli("show route").contains(VIP4), "the withdrawal");
    assert!(stopped.elapsed() < Duration::from_secs(5));
    assert!(again.wait(), "{}", again.log_text());
}

/// The same with FRR, which sets the N bit (RFC 8538) as vip does: a restart ends the session
/// with Cease / Administrative Reset and FRR keeps the route as stale; a stop sends Cease / Hard
/// Reset, after which FRR keeps nothing.
#[test]
fn frr_keeps_the_routes_of_a_restarting_agent() {
    let (rt, lbs) = topology(1);
    let frr = Frr::start(
        &rt,
        "router bgp 65000\n bgp router-id 198.18.1.1\n no bgp ebgp-requires-policy\n\
         bgp graceful-restart\n neighbor 198.18.1.2 remote-as 65001\n\
         neighbor 198.18.1.2 timers 1 3\n neighbor 198.18.1.2 timers connect 1\n",
    );
    let lb_conf = lb_config(&lbs[0], 1, "graceful_restart_time = 30\n", &[VIP4]);
    let mut agent = Agent::start(&lbs[0], &lb_conf, &[]);
    let has_route = |f: &Frr| {
        f.cli("show bgp ipv4 unicast")
            .contains(&format!("{VIP4}/32"))
    };
    frr.wait_for(has_route, "the VIP at FRR");
    let neighbor = frr.cli("show bgp neighbors 198.18.1.2");
    assert!(neighbor.contains("N bit: True"), "{neighbor}");
    agent.signal(libc::SIGUSR2);
    assert_eq!(agent.exit_status().code(), Some(75), "{}", agent.log_text());
    thread::sleep(Duration::from_secs(4));
    let table = frr.cli(&format!("show bgp ipv4 unicast {VIP4}/32"));
    assert!(
        table.contains("stale") || table.contains("Stale"),
        "{table}"
    );
    let neighbor = frr.cli("show bgp neighbors 198.18.1.2");
    assert!(
        neighbor.contains("Cease/Administrative Reset"),
        "{neighbor}"
    );
    let mut again = Agent::start(&lbs[0], &lb_conf, &[]);
    frr.wait_for(
        |f| {
            let t = f.cli(&format!("show bgp ipv4 unicast {VIP4}/32"));
            t.contains(VIP4) && !t.to_lowercase().contains("stale")
        },
        "the route refreshed by the next agent",
    );
    again.signal(libc::SIGTERM);
    assert!(again.wait(), "{}", again.log_text());
    frr.wait_for(|f| !has_route(f), "the route gone after a stop");
    let neighbor = frr.cli("show bgp neighbors 198.18.1.2");
    assert!(neighbor.contains("Hard Reset"), "{neighbor}");
    assert!(!neighbor.contains("Stale"), "{neighbor}");
}

/// A scripted router: it accepts the agent's connection, then misbehaves.
mod scripted {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        time::Duration,
    };

    use vip_agent::bgp::wire::{self, Message, OpenParams};

    pub(crate) fn accept(listener: &TcpListener) -> TcpStream {
        let (stream, _) = listener.accept().expect("the agent connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    pub(crate) fn read(stream: &mut TcpStream) -> Option<Message> {
        let mut header = [0u8; wire::HEADER_LEN];
        stream.read_exact(&mut header).ok()?;
        let len = usize::from(u16::from_be_bytes([header[16], header[17]]));
        let mut whole = header.to_vec();
        whole.resize(len, 0);
        stream.read_exact(&mut whole[wire::HEADER_LEN..]).ok()?;
        wire::parse_message(&whole).ok()
    }

    pub(crate) fn open() -> Vec<u8> {
        open_as("198.18.1.1")
    }

    /// The router's OPEN with BGP identifier `router_id`.
    pub(crate) fn open_as(router_id: &str) -> Vec<u8> {
        wire::encode_open(&OpenParams {
            asn: 65000,
            hold_time: 9,
            router_id: router_id.parse().unwrap(),
            graceful_restart: None,
        })
    }

    /// Completes the handshake as the router.
    pub(crate) fn establish(stream: &mut TcpStream) {
        assert!(matches!(read(stream), Some(Message::Open(_))));
        stream.write_all(&open()).unwrap();
        stream.write_all(&wire::encode_keepalive()).unwrap();
        assert!(matches!(read(stream), Some(Message::Keepalive)));
    }

    /// Reads until the agent's NOTIFICATION (skipping its UPDATEs and KEEPALIVEs).
    pub(crate) fn notification(stream: &mut TcpStream) -> wire::Notification {
        loop {
            match read(stream) {
                Some(Message::Notification(n)) => return n,
                Some(_) => continue,
                None => panic!("connection closed without a NOTIFICATION"),
            }
        }
    }
}

#[test]
fn malformed_messages_reset_the_session_and_the_agent_stays_up() {
    use std::io::Write;
    use vip_agent::bgp::wire::{self, code};

    let (rt, lbs) = topology(1);
    let listener = rt.within(|| std::net::TcpListener::bind("198.18.1.1:179").expect("bind 179"));
    let mut agent = Agent::start(&lbs[0], &lb_config(&lbs[0], 1, "", &[VIP4]), &[]);

    // 1. A malformed UPDATE after the session is up: attribute length beyond the message.
    let mut s = scripted::accept(&listener);
    scripted::establish(&mut s);
    let mut bad_update = vec![0xff; 16];
    bad_update.extend_from_slice(&[0, 23, wire::UPDATE, 0, 0, 0x0f, 0xff]);
    s.write_all(&bad_update).unwrap();
    let n = scripted::notification(&mut s);
    assert_eq!(
        (n.code, n.subcode),
        (code::UPDATE_MESSAGE, code::MALFORMED_ATTRIBUTE_LIST)
    );

    // 2. An oversized length in a header.
    let mut s = scripted::accept(&listener);
    scripted::establish(&mut s);
    let mut oversized = vec![0xff; 16];
    oversized.extend_from_slice(&[0x20, 0x00, wire::KEEPALIVE]);
    s.write_all(&oversized).unwrap();
    let n = scripted::notification(&mut s);
    assert_eq!(
        (n.code, n.subcode),
        (code::MESSAGE_HEADER, code::BAD_MESSAGE_LENGTH)
    );

    // 3. A malformed OPEN: version 3, then one whose parameters lie about their length.
    for (mangle, subcode) in [(0usize, code::UNSUPPORTED_VERSION), (9, 0)] {
        let mut s = scripted::accept(&listener);
        assert!(matches!(
            scripted::read(&mut s),
            Some(wire::Message::Open(_))
        ));
        let mut open = scripted::open();
        if mangle == 0 {
            open[wire::HEADER_LEN] = 3;
        } else {
            open[wire::HEADER_LEN + mangle] += 7;
        }
        s.write_all(&open).unwrap();
        let n = scripted::notification(&mut s);
        assert!(
            n.code == code::OPEN_MESSAGE || n.code == code::MESSAGE_HEADER,
            "{n:?}"
        );
        if subcode != 0 {
            assert_eq!(n.subcode, subcode);
        }
    }

    // 4. Garbage instead of a marker.
    let mut s = scripted::accept(&listener);
    let _ = scripted::read(&mut s);
    s.write_all(&[0x42; 64]).unwrap();
    let n = scripted::notification(&mut s);
    assert_eq!(
        (n.code, n.subcode),
        (code::MESSAGE_HEADER, code::CONNECTION_NOT_SYNCHRONIZED)
    );

    // The agent survived all of it and keeps trying.
    let mut s = scripted::accept(&listener);
    scripted::establish(&mut s);

    // 5. Not malformed: a message split over segments that straddle the agent's keepalive timer
    // (every second with hold time 3). The partial read must survive the timer firing.
    let downs = || agent_log_count(&agent, "BGP session down");
    let before = downs();
    let mut split = wire::encode_end_of_rib().remove(0);
    split.extend(wire::encode_keepalive());
    s.write_all(&split[..10]).unwrap();
    thread::sleep(Duration::from_millis(1500));
    s.write_all(&split[10..]).unwrap();
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        downs(),
        before,
        "session broken by a split message: {}",
        agent.log_text()
    );
    assert!(agent.running(), "{}", agent.log_text());
    assert!(
        !agent.log_text().contains("panicked"),
        "{}",
        agent.log_text()
    );
}

/// Both sides connect at once (RFC 4271 6.8): the connection opened by the speaker with the
/// higher BGP identifier stays, the other gets Cease / connection collision. The agent is
/// 198.18.1.2; the scripted router first has the lower identifier, then the higher.
#[test]
fn connection_collisions_keep_the_connection_of_the_higher_router_id() {
    use std::{io::Write, net::TcpStream};
    use vip_agent::bgp::wire::{self, Message, code};

    for (router_id, agent_keeps_its_own) in [("198.18.1.1", true), ("198.18.1.3", false)] {
        let (rt, lbs) = topology(1);
        let listener =
            rt.within(|| std::net::TcpListener::bind("198.18.1.1:179").expect("bind 179"));
        let config = lb_config(&lbs[0], 1, "listen = true\n", &[VIP4]);
        let mut agent = Agent::start(&lbs[0], &config, &[]);
        // The agent's connection, in OpenSent.
        let mut ours = scripted::accept(&listener);
        assert!(matches!(scripted::read(&mut ours), Some(Message::Open(_))));
        // The router connects too, as one whose connect raced the agent's would.
        let mut theirs = rt.within(|| TcpStream::connect("198.18.1.2:179").expect("connect"));
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        theirs.write_all(&scripted::open_as(router_id)).unwrap();
        thread::sleep(Duration::from_millis(300));
        // The router's OPEN on the agent's connection: the agent now knows both identifiers.
        ours.write_all(&scripted::open_as(router_id)).unwrap();

        let (mut kept, mut closed) = if agent_keeps_its_own {
            (ours, theirs)
        } else {
            (theirs, ours)
        };
        let n = scripted::notification(&mut closed);
        assert_eq!(
            (n.code, n.subcode),
            (code::CEASE, code::CONNECTION_COLLISION),
            "router {router_id}: the losing connection is closed"
        );
        if !agent_keeps_its_own {
            // The agent continues on the router's connection with its own OPEN.
            assert!(matches!(scripted::read(&mut kept), Some(Message::Open(_))));
        }
        assert!(matches!(
            scripted::read(&mut kept),
            Some(Message::Keepalive)
        ));
        kept.write_all(&wire::encode_keepalive()).unwrap();
        assert!(
            matches!(scripted::read(&mut kept), Some(Message::Update)),
            "router {router_id}: routes on the surviving connection"
        );
        assert!(agent.running(), "{}", agent.log_text());
    }
}

#[test]
fn node_drain_marks_routes_graceful_shutdown_and_undrain_clears_it() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &bird_config(1, None));
    let _agent = Agent::start(&lbs[0], &lb_config(&lbs[0], 1, "", &[VIP4]), &[]);
    bird.wait_for(|b| b.cli("show route").contains(VIP4), "the route");
    let cli = |cmd: &str| lbs[0].agent_cli(&[cmd]);
    assert!(cli("drain").contains("node drained"));
    bird.wait_for(
        |b| {
            b.cli(&format!("show route {VIP4}/32 all"))
                .contains("(65535,0)")
        },
        "GRACEFUL_SHUTDOWN while drained",
    );
    // Drained, not withdrawn.
    assert!(bird.cli("show route").contains(VIP4));
    assert!(cli("undrain").contains("node undrained"));
    bird.wait_for(
        |b| {
            !b.cli(&format!("show route {VIP4}/32 all"))
                .contains("(65535,0)")
        },
        "the community gone after undrain",
    );
}

#[test]
fn passive_peers_are_accepted_and_strangers_refused() {
    use std::io::{Read, Write};
    let (rt, lbs) = topology(1);
    let config = lb_config(&lbs[0], 1, "", &[VIP4])
        .replace("asn = 65000\n", "asn = 65000\npassive = true\n");
    let _agent = Agent::start(&lbs[0], &config, &[]);
    // BIRD connects (vip does not); the session comes up and the route is there.
    let bird = Bird::start(&rt, &bird_config(1, None));
    bird.wait_for(
        |b| b.cli("show route").contains(VIP4),
        "the route over a passive session",
    );

    // A connection from an address that is no peer: Cease / connection rejected.
    rt.ip(&["addr", "add", "198.18.1.9/24", "dev", "r1"]);
    let reply = rt.within(|| {
        // From the stranger's address, 198.18.1.9.
        let s = socket2_connect("198.18.1.9", "198.18.1.2:179");
        let mut s = s.expect("connect to the agent's BGP port");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.write_all(&[]);
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        buf.truncate(n);
        buf
    });
    assert!(reply.len() >= 21, "no NOTIFICATION: {reply:?}");
    assert_eq!(
        (reply[18], reply[19], reply[20]),
        (3, 6, 5),
        "Cease / connection rejected expected"
    );
}

fn agent_log_count(agent: &Agent, needle: &str) -> usize {
    agent.log_text().matches(needle).count()
}

/// A TCP connection from a chosen source address.
fn socket2_connect(source: &str, target: &str) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    let src: std::net::SocketAddrV4 = format!("{source}:0").parse().unwrap();
    let dst: std::net::SocketAddrV4 = target.parse().unwrap();
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: plain socket calls on a fresh descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let len = size_of::<libc::sockaddr_in>() as u32;
        let s = sockaddr(src);
        if libc::bind(fd, std::ptr::from_ref(&s).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let d = sockaddr(dst);
        if libc::connect(fd, std::ptr::from_ref(&d).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

#[test]
fn a_peer_with_another_router_id_is_refused() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &bird_config(1, None));
    let config = lb_config(&lbs[0], 1, "", &[VIP4])
        .replace("asn = 65000\n", "asn = 65000\nrouter_id = \"9.9.9.9\"\n");
    let mut agent = Agent::start(&lbs[0], &config, &[]);
    agent.wait_for_log("bad BGP identifier", 1);
    assert!(!established(&bird, "lb1"));
}

/// A session carries only the VIPs it can: over an IPv4 session without `next_hop_v6` the IPv6
/// VIP is not sent (and not counted), `status` says so, and the IPv6 session carries it.
#[test]
fn routes_a_session_cannot_carry_are_named_and_not_counted() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(
        &rt,
        &(bird_config(1, None)
            + "protocol bgp lb1v6 { local fd00:18:1::1 as 65000; neighbor fd00:18:1::2 as 65001; \
               hold time 3; connect retry time 1; error wait time 1, 2;\n\
               ipv4 { import all; export none; }; ipv6 { import all; export none; }; }\n"),
    );
    let config = lb_config(&lbs[0], 1, "", &[VIP4, VIP6])
        .replace("next_hop_v6 = \"fd00:18:1::2\"\n", "")
        .replace(
            "[[bgp.peer]]\naddress = \"198.18.1.1\"\nasn = 65000\n",
            "[[bgp.peer]]\naddress = \"198.18.1.1\"\nasn = 65000\n\
             [[bgp.peer]]\naddress = \"fd00:18:1::1\"\nasn = 65000\n",
        );
    let _agent = Agent::start(&lbs[0], &config, &[]);
    bird.wait_for(
        |b| b.cli("show route protocol lb1v6").contains(VIP6),
        "the IPv6 VIP over the IPv6 session",
    );
    bird.wait_for(
        |b| b.cli("show route protocol lb1").contains(VIP4),
        "the IPv4 VIP over the IPv4 session",
    );
    assert!(!bird.cli("show route protocol lb1").contains(VIP6));
    let metrics = lbs[0].metrics();
    assert!(
        metrics.contains("vip_bgp_routes_announced{peer=\"198.18.1.1\"} 1"),
        "{metrics}"
    );
    let pins = lbs[0].pin_dir.to_string_lossy().into_owned();
    let status = lbs[0].agent_cli(&["status", "--pin-dir", &pins]);
    assert!(
        status.contains(&format!(
            "bgp peer 198.18.1.1: Established, 1 routes announced, not carried (family not negotiated or no next hop of it): {VIP6}"
        )),
        "{status}"
    );
}
