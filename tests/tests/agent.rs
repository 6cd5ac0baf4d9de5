//! The real `vip-agent` binary on an LB node and a backend, in network namespaces:
//!
//! ```text
//!   ns lb:  up0 (198.18.0.2) ── XDP vip_lb ──┐        the generator injects client frames on gen0;
//!   ns be:  gen0 (198.18.0.1) ── XDP vip_decap┘        the LB sends them back encapsulated to the
//!                                                      backend 198.18.1.1 via gen0, whose decap
//!                                                      program counts them
//! ```

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use vip_agent::{
    dataplane::DecapPlane,
    dataplane::{Dataplane, DataplaneOptions},
};
use vip_common::layout;
use vip_tests::{
    node::{Agent, FrameSender, Netns, agent},
    packet::*,
};

const VIP4: &str = "198.19.0.1";
const VIP4B: &str = "198.19.0.2";
const VIP6: &str = "fd00:19::1";
const BACKEND4: &str = "198.18.1.1";
const BACKEND6: &str = "fd00:1::1";

fn lb_config(pin_dir: &std::path::Path, vips: &str) -> String {
    format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.0.2\"\nsource_v6 = \"fd00:18::2\"\n\
         pin_dir = \"{}\"\ntable_size = 251\nconntrack_entries = 8192\n{vips}",
        pin_dir.display()
    )
}

fn vip(addr: &str, proto: &str, port: u16, backend: &str) -> String {
    format!(
        "\n[[vip]]\naddress = \"{addr}\"\nprotocol = \"{proto}\"\nport = {port}\n\
         [[vip.backend]]\naddress = \"{backend}\"\n"
    )
}

/// The LB's pinned maps, opened from the test as `status` opens them.
fn lb_maps(pin_dir: &std::path::Path) -> Dataplane {
    let options = DataplaneOptions::from_pins(pin_dir).expect("sizes from the pins");
    assert_eq!((options.table_size, options.conntrack_entries), (251, 8192));
    Dataplane::load(options).expect("open the LB's pinned maps")
}

fn decapsulated(pin_dir: &std::path::Path) -> u64 {
    DecapPlane::load(Some(pin_dir))
        .expect("open the backend's pinned maps")
        .stats()
        .expect("stats")
        .decapsulated
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn client_frame(i: u16, vip: &str, port: u16) -> Vec<u8> {
    let client = if vip.contains(':') {
        "fd00:50::7"
    } else {
        "198.18.50.7"
    };
    Frame::tcp(client, 10_000 + i, vip, port, TCP_ACK).build()
}

/// GET `path` from the agent's metrics address inside `ns`.
fn http_get(ns: &Netns, path: &str) -> String {
    ns.http_get(path).expect("the agent's metrics listener")
}

fn lo_addresses(ns: &Netns) -> String {
    ns.ip(&["addr", "show", "dev", "lo"])
}

#[test]
fn agent_lifecycle_on_lb_and_backend() {
    let lb = Netns::new("lb");
    let be = Netns::new("be");
    lb.ip(&[
        "link", "add", "up0", "type", "veth", "peer", "name", "gen0", "netns", &be.name,
    ]);
    lb.ip(&["addr", "add", "198.18.0.2/24", "dev", "up0"]);
    lb.ip(&["addr", "add", "fd00:18::2/64", "dev", "up0", "nodad"]);
    lb.ip(&["link", "set", "up0", "up"]);
    be.ip(&["addr", "add", "198.18.0.1/24", "dev", "gen0"]);
    be.ip(&["addr", "add", "fd00:18::1/64", "dev", "gen0", "nodad"]);
    be.ip(&["link", "set", "gen0", "up"]);
    lb.ip(&["route", "add", "198.18.1.0/24", "via", "198.18.0.1"]);
    lb.ip(&["-6", "route", "add", "fd00:1::/64", "via", "fd00:18::1"]);
    let gen_mac = be.mac("gen0");
    let mac = gen_mac.map(|b| format!("{b:02x}")).join(":");
    for gateway in ["198.18.0.1", "fd00:18::1"] {
        lb.ip(&[
            "neigh",
            "replace",
            gateway,
            "lladdr",
            &mac,
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
    }

    // The backend: decapsulation on gen0, VIPs on its lo.
    let backend_config = format!(
        "[node]\nrole = \"backend\"\ninterfaces = [\"gen0\"]\npin_dir = \"{}\"\n\
         [backend]\naddresses = [\"{BACKEND4}\", \"{BACKEND6}\"]\nvips = [\"{VIP4}\", \"{VIP4B}\", \"{VIP6}\"]\n",
        be.pin_dir.display()
    );
    let mut backend = Agent::start(&be, &backend_config, &["--cleanup"]);
    backend.wait_for(&be.pin_dir.join("links/xdp_gen0"));

    // The LB node.
    let vips = vip(VIP4, "tcp", 80, BACKEND4) + &vip(VIP6, "tcp", 80, BACKEND6);
    let mut first = Agent::start(&lb, &lb_config(&lb.pin_dir, &vips), &[]);
    first.wait_for(&lb.pin_dir.join("links/xdp_up0"));
    first.wait_for_log("VIP addresses on lo", 1);

    // Filled maps, seen through bpftool and status; VIPs on lo; next hops resolved.
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(lb.pin_dir.join(layout::VIPS))
        .output()
        .expect("bpftool");
    let json = String::from_utf8_lossy(&dump.stdout);
    assert_eq!(json.matches("\"vip_id\"").count(), 2, "{json}");
    let pin = lb.pin_dir.to_string_lossy().into_owned();
    let status =
        String::from_utf8_lossy(&agent(&["status", "--pin-dir", &pin]).stdout).into_owned();
    for needle in [
        VIP4,
        VIP6,
        BACKEND4,
        BACKEND6,
        "ifindex",
        "tcp/198.19.0.1:80 (IP-in-IP)",
    ] {
        assert!(status.contains(needle), "status lacks {needle}: {status}");
    }
    let lo = lo_addresses(&lb);
    assert!(lo.contains(VIP4) && lo.contains(VIP6), "{lo}");
    assert!(lo_addresses(&be).contains(VIP4B));

    // Traffic: every frame reaches the backend encapsulated, and is counted per VIP.
    let sender = FrameSender::open(&be, "gen0");
    for i in 0..100 {
        sender.send(&client_frame(i, VIP4, 80));
        sender.send(&client_frame(i, VIP6, 80));
    }
    wait_until("200 decapsulated", || decapsulated(&be.pin_dir) == 200);
    let maps = lb_maps(&lb.pin_dir);
    let per_vip: u64 = maps
        .traffic_by_vip()
        .unwrap()
        .values()
        .map(|t| t.packets)
        .sum();
    assert_eq!(per_vip, 200);
    // Datapath logs are off unless asked for.
    assert!(!first.log_text().contains("XDP_TX"), "{}", first.log_text());
    let metrics = http_get(&lb, "/metrics");
    for line in [
        "vip_service_packets_total{vip=\"198.19.0.1\",protocol=\"tcp\",port=\"80\"} 100",
        "vip_service_packets_total{vip=\"fd00:19::1\",protocol=\"tcp\",port=\"80\"} 100",
        "vip_backend_packets_total{vip=\"198.19.0.1\",protocol=\"tcp\",port=\"80\",backend=\"198.18.1.1\"} 100",
        "vip_datapath_packets_total{outcome=\"tx\"} 200",
        "vip_datapath_drops_total{reason=\"malformed\"} 0",
        // Each frame is a flow of its own: 100 entries per family, all to one backend each.
        "vip_conntrack_entries{family=\"ipv4\"} 100",
        "vip_conntrack_entries{family=\"ipv6\"} 100",
        "vip_conntrack_capacity{family=\"ipv4\"} 8192",
        "vip_backend_conntrack_entries{vip=\"198.19.0.1\",protocol=\"tcp\",port=\"80\",backend=\"198.18.1.1\"} 100",
    ] {
        assert!(metrics.contains(line), "metrics lack {line}: {metrics}");
    }
    assert!(http_get(&lb, "/readyz").starts_with("HTTP/1.1 200"));
    assert!(
        http_get(&be, "/metrics").contains("vip_decap_packets_total{outcome=\"decapsulated\"} 200")
    );
    let flows = agent(&["flows", "--pin-dir", &pin, "--vip", VIP4]);
    let flows = String::from_utf8_lossy(&flows.stdout).into_owned();
    assert!(
        flows.contains("100 flows") && flows.contains(BACKEND4),
        "{flows}"
    );
    let which_args = [
        "which",
        "--pin-dir",
        &pin,
        "--vip",
        "198.19.0.1:80",
        "--flow",
        "198.18.77.1:4242",
    ];
    let which = agent(&which_args);
    let which = String::from_utf8_lossy(&which.stdout).into_owned();
    assert!(which.contains(&format!("backend {BACKEND4}")), "{which}");
    // The same as JSON, for scripts; and the flows.
    let json = agent(&[&which_args[..], &["-o", "json"]].concat());
    let json = String::from_utf8_lossy(&json.stdout).into_owned();
    assert!(
        json.contains(&format!("\"backend\": \"{BACKEND4}\""))
            && json.contains("\"action\": \"XDP_"),
        "{json}"
    );
    let json = agent(&["flows", "--pin-dir", &pin, "--vip", VIP4, "-o", "json"]);
    let json = String::from_utf8_lossy(&json.stdout).into_owned();
    assert_eq!(json.matches("\"protocol\": \"tcp\"").count(), 100, "{json}");
    // A question leaves nothing behind: still the 100 flows of the traffic.
    let flows = agent(&["flows", "--pin-dir", &pin, "--vip", VIP4]);
    let flows = String::from_utf8_lossy(&flows.stdout).into_owned();
    assert!(
        flows.contains("100 flows"),
        "`which` left an entry: {flows}"
    );

    // Reload: add a VIP, remove one.
    let reloaded = vip(VIP4, "tcp", 80, BACKEND4) + &vip(VIP4B, "udp", 53, BACKEND4);
    first.rewrite_config(&lb_config(&lb.pin_dir, &reloaded));
    first.signal(libc::SIGHUP);
    first.wait_for_log("reloaded", 1);
    let keys: Vec<IpAddr> = maps
        .vips()
        .unwrap()
        .iter()
        .map(|(k, _)| vip_common::addr_from_bytes(&k.addr, k.family).unwrap())
        .collect();
    assert!(
        keys.contains(&VIP4B.parse().unwrap()) && !keys.contains(&VIP6.parse().unwrap()),
        "{keys:?}"
    );
    let lo = lo_addresses(&lb);
    assert!(lo.contains(VIP4B) && !lo.contains(VIP6), "{lo}");

    // A bad reload changes nothing, and traffic keeps flowing.
    first.rewrite_config("[node]\ninterfaces = [\"up0\"]\n[[vip]]\naddress = \"nonsense\"\n");
    first.signal(libc::SIGHUP);
    first.wait_for_log("reload rejected", 1);
    assert_eq!(maps.vips().unwrap().len(), 2);
    let metrics = http_get(&lb, "/metrics");
    assert!(
        metrics.contains("vip_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vip_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    let before = decapsulated(&be.pin_dir);
    for i in 0..50 {
        sender.send(&client_frame(i, VIP4, 80));
    }
    wait_until("50 more decapsulated", || {
        decapsulated(&be.pin_dir) == before + 50
    });
    first.rewrite_config(&lb_config(&lb.pin_dir, &reloaded));

    // Restart under a steady stream: SIGKILL, start again; no packet lost, conntrack kept.
    let flows_before = maps.flows().unwrap().len();
    let before = decapsulated(&be.pin_dir);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let stream = {
        let (sent, done) = (sent.clone(), done.clone());
        let sender = FrameSender::open(&be, "gen0");
        thread::spawn(move || {
            let mut i = 0u16;
            while !done.load(Ordering::Relaxed) {
                sender.send(&client_frame(i % 100, VIP4, 80));
                sent.fetch_add(1, Ordering::Relaxed);
                i = i.wrapping_add(1);
                thread::sleep(Duration::from_micros(500));
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    first.kill();
    thread::sleep(Duration::from_millis(300));
    let mut second = Agent::start(&lb, &lb_config(&lb.pin_dir, &reloaded), &["--cleanup"]);
    second.wait_for_log("switched the running program", 1);
    thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 500, "only {sent} frames sent");
    wait_until("every frame of the stream decapsulated", || {
        decapsulated(&be.pin_dir) == before + sent
    });
    assert!(
        maps.flows().unwrap().len() >= flows_before,
        "conntrack entries lost"
    );
    assert!(second.log_text().contains("took over pinned state"));

    // A pinned map of another shape is refused, clearly, and the running datapath stays.
    // (Its own metrics port and control socket: the running agent holds the default ones.)
    let refused_socket = std::env::temp_dir().join(format!("{}-refused.sock", lb.name));
    let wrong = lb_config(&lb.pin_dir, &reloaded)
        .replace("conntrack_entries = 8192", "conntrack_entries = 4096")
        .replace(
            "[node]\n",
            &format!(
                "[node]\nmetrics_address = \"127.0.0.1:9101\"\ncontrol_socket = \"{}\"\n",
                refused_socket.display()
            ),
        );
    let mut refused = Agent::start(&lb, &wrong, &[]);
    assert!(
        !refused.wait(),
        "an agent with a mismatching layout must exit with an error"
    );
    let log = refused.log_text();
    assert!(
        log.contains("pinned map") && log.contains("CT_TABLE") && log.contains("1024"),
        "{log}"
    );
    assert!(lb.pin_dir.join("links/xdp_up0").exists());

    // --cleanup leaves no pin, no program, no address.
    drop(maps);
    second.signal(libc::SIGTERM);
    assert!(second.wait(), "{}", second.log_text());
    backend.signal(libc::SIGTERM);
    assert!(backend.wait(), "{}", backend.log_text());
    assert!(!lb.pin_dir.exists(), "pins left behind");
    assert!(!be.pin_dir.exists(), "pins left behind");
    assert!(
        !lb.ip(&["link", "show", "up0"]).contains("xdp"),
        "XDP left attached"
    );
    assert!(
        !be.ip(&["link", "show", "gen0"]).contains("xdp"),
        "XDP left attached"
    );
    let lo = lo_addresses(&lb);
    assert!(!lo.contains(VIP4) && !lo.contains(VIP4B), "{lo}");
    assert!(!lo_addresses(&be).contains(VIP4));
}

/// An LB namespace `tag` whose `up0` (198.18.0.2/24) is a veth to `peer_dev` in a second
/// namespace, with the backends' network 198.18.1.0/24 routed via 198.18.0.1.
fn lb_with_peer(tag: &str, peer_dev: &str) -> (Netns, Netns) {
    let lb = Netns::new(tag);
    let peer = Netns::new(&format!("{tag}p"));
    lb.ip(&[
        "link", "add", "up0", "type", "veth", "peer", "name", peer_dev, "netns", &peer.name,
    ]);
    lb.ip(&["addr", "add", "198.18.0.2/24", "dev", "up0"]);
    lb.ip(&["link", "set", "up0", "up"]);
    peer.ip(&["link", "set", peer_dev, "up"]);
    lb.ip(&["route", "add", "198.18.1.0/24", "via", "198.18.0.1"]);
    (lb, peer)
}

fn permanent_neighbour(ns: &Netns, address: &str, mac: &str) {
    ns.ip(&[
        "neigh",
        "replace",
        address,
        "lladdr",
        mac,
        "dev",
        "up0",
        "nud",
        "permanent",
    ]);
}

/// Next hops follow the kernel's neighbour and route events: each change shows in the
/// backend's entry within the time of an event, well inside the agent's fallback timer (10 s).
#[test]
fn next_hops_follow_neighbour_and_route_changes() {
    let (lb, _gw) = lb_with_peer("nh", "gw0");
    let neighbour = |address: &str, mac: &str| permanent_neighbour(&lb, address, mac);
    neighbour("198.18.0.1", "02:00:00:00:00:01");
    let mut agent = Agent::start(
        &lb,
        &lb_config(&lb.pin_dir, &vip(VIP4, "tcp", 80, BACKEND4)),
        &[],
    );
    agent.wait_for(&lb.pin_dir.join("links/xdp_up0"));
    let maps = lb_maps(&lb.pin_dir);
    let backend: std::net::Ipv4Addr = BACKEND4.parse().unwrap();
    let next_hop_mac = || {
        let backends = maps.backends().expect("read BACKENDS");
        let (_, b) = backends
            .iter()
            .find(|(_, b)| b.addr[..4] == backend.octets())
            .expect("the backend's entry");
        (b.flags & vip_common::BACKEND_F_NEXTHOP != 0).then_some(b.dst_mac)
    };
    let expect = |what: &str, mac: Option<[u8; 6]>| {
        let deadline = Instant::now() + Duration::from_secs(2);
        while next_hop_mac() != mac {
            assert!(
                Instant::now() < deadline,
                "{what}: next hop {:?}, want {mac:?}\n{}",
                next_hop_mac(),
                agent.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    expect("at start", Some([2, 0, 0, 0, 0, 1]));
    neighbour("198.18.0.1", "02:00:00:00:00:02");
    expect("gateway's MAC changed", Some([2, 0, 0, 0, 0, 2]));
    neighbour("198.18.0.3", "02:00:00:00:00:03");
    lb.ip(&["route", "replace", "198.18.1.0/24", "via", "198.18.0.3"]);
    expect("route via another gateway", Some([2, 0, 0, 0, 0, 3]));
    lb.ip(&["neigh", "del", "198.18.0.3", "dev", "up0"]);
    expect("gateway's neighbour gone", None);
}

/// `run --datapath-log`: the datapath logs each packet for a VIP through aya-log, with what
/// became of it, the client's flow and the backend.
#[test]
fn datapath_logs_say_what_became_of_each_packet() {
    let (lb, be) = lb_with_peer("dlog", "gen0");
    let mac = be.mac("gen0").map(|b| format!("{b:02x}")).join(":");
    permanent_neighbour(&lb, "198.18.0.1", &mac);
    let mut agent = Agent::start(
        &lb,
        &lb_config(&lb.pin_dir, &vip(VIP4, "tcp", 80, BACKEND4)),
        &["--datapath-log"],
    );
    agent.wait_for_log("datapath debug logs on", 1);
    agent.wait_for(&lb.pin_dir.join("links/xdp_up0"));

    let sender = FrameSender::open(&be, "gen0");
    sender.send(&client_frame(1, VIP4, 80));
    let mut lying = client_frame(2, VIP4, 80);
    lying[16..18].copy_from_slice(&[0x05, 0xdc]); // IPv4 total length beyond the frame
    sender.send(&lying);
    // Not for a VIP: passed, and not logged.
    sender.send(&client_frame(3, "198.19.0.99", 80));
    agent.wait_for_log(
        "XDP_TX 198.18.50.7:10001 -> 198.19.0.1:80 proto 6 to backend 198.18.1.1",
        1,
    );
    agent.wait_for_log(
        "dropped: malformed 198.18.50.7:10002 -> 198.19.0.1:80 proto 6",
        1,
    );
    assert!(!agent.log_text().contains("198.19.0.99"));
}
