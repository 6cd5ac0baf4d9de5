//! The agent's runtime with the real agent: a backend's status has one owner across reloads,
//! and a reload is planned whole, so it either fits or changes nothing (issue #14's defects).

use std::{
    thread,
    time::{Duration, Instant},
};

use vip_agent::dataplane::{Dataplane, DataplaneOptions};
use vip_tests::node::{Agent, Netns, TcpService};

const VIP4: &str = "198.19.0.1";
/// The backend: the gateway's end of the LB's uplink (`Netns::lb_with_gateway`).
const BACKEND: &str = "198.18.0.1";

fn health_config(lb: &Netns, interval: &str) -> String {
    format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.0.2\"\npin_dir = \"{}\"\n\
         table_size = 251\nconntrack_entries = 4096\nmetrics_address = \"127.0.0.1:7179\"\n\
         [[vip]]\naddress = \"{VIP4}\"\nprotocol = \"tcp\"\nport = 80\n\
         [vip.health]\ncheck = \"tcp\"\nport = 8080\ninterval = {interval}\ntimeout = 0.1\n\
         rise = 5\nfall = 2\n\
         [[vip.backend]]\naddress = \"{BACKEND}\"\n",
        lb.pin_dir.display()
    )
}

/// Waits until `backends` shows the backend's line containing `what`.
fn wait_backend(lb: &Netns, agent: &Agent, what: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let out = lb.agent_cli(&["backends"]);
        if out.lines().any(|l| l.contains(BACKEND) && l.contains(what)) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "backend not {what:?} within {within:?}: {out}\n{}",
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A backend marked down, its service back, then a reload that changes only the check's
/// interval (0.1 s to 0.2 s) before the old check saw `rise` successes: the restarted check
/// starts from "down" and brings the backend up after `rise` successes. Every view agrees:
/// `backends`, `vip_backend_healthy` and the table (the VIP forwards again).
#[test]
fn a_reload_that_changes_a_check_does_not_strand_a_down_backend() {
    let (lb, be) = Netns::lb_with_gateway("hcre");
    let service = TcpService::start(&be, BACKEND, 8080);
    let mut agent = Agent::start(&lb, &health_config(&lb, "0.1"), &["--cleanup"]);
    agent.wait_for(&lb.pin_dir.join("links/xdp_up0"));
    wait_backend(&lb, &agent, "active: ok in", Duration::from_secs(10));

    drop(service);
    wait_backend(&lb, &agent, "down", Duration::from_secs(5));
    let healthy = format!(
        "vip_backend_healthy{{vip=\"{VIP4}\",protocol=\"tcp\",port=\"80\",backend=\"{BACKEND}\"}}"
    );
    assert!(lb.metrics().contains(&format!("{healthy} 0")));

    // The service is back; the reload comes well before 5 successes at 0.1 s.
    let _service = TcpService::start(&be, BACKEND, 8080);
    agent.rewrite_config(&health_config(&lb, "0.2"));
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reloaded", 1);
    wait_backend(&lb, &agent, "active: ok in", Duration::from_secs(5));
    assert!(
        lb.metrics().contains(&format!("{healthy} 1")),
        "{}",
        lb.metrics()
    );
    // Its entry is present again (a down backend's is not).
    let maps = Dataplane::load(DataplaneOptions::from_pins(&lb.pin_dir).unwrap()).unwrap();
    assert!(
        maps.backends()
            .unwrap()
            .iter()
            .any(|(_, b)| b.addr[..4] == [198, 18, 0, 1]),
        "the backend's entry is present again"
    );
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(), "{}", agent.log_text());
}

/// `vips` VIPs (198.19.1.N) on `port` in 16 table slots, each with one backend.
fn many_vips(lb: &Netns, vips: u8, port: u16) -> String {
    let mut c = format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.0.2\"\npin_dir = \"{}\"\n\
         table_size = 251\ntable_slots = 16\nconntrack_entries = 4096\n\
         metrics_address = \"127.0.0.1:7179\"\n",
        lb.pin_dir.display()
    );
    for v in 1..=vips {
        c += &format!(
            "[[vip]]\naddress = \"198.19.1.{v}\"\nprotocol = \"tcp\"\nport = {port}\n\
             [[vip.backend]]\naddress = \"{BACKEND}\"\n"
        );
    }
    c
}

/// The ports of the VIPs in the pinned maps.
fn pinned_ports(lb: &Netns) -> Vec<u16> {
    let maps = Dataplane::load(DataplaneOptions::from_pins(&lb.pin_dir).unwrap()).unwrap();
    let mut ports: Vec<u16> = maps
        .vips()
        .unwrap()
        .iter()
        .map(|(k, _)| u16::from_be_bytes(k.port))
        .collect();
    ports.sort();
    ports
}

/// 15 VIPs in 16 table slots, and a reload that changes every VIP's port: what leaves goes
/// before what comes, so it fits. A restart over the pinned state with yet other ports plans
/// the same way and starts.
#[test]
fn a_reload_that_replaces_every_vip_fits_and_so_does_a_restart() {
    let (lb, _be) = Netns::lb_with_gateway("slots");
    let mut agent = Agent::start(&lb, &many_vips(&lb, 15, 80), &[]);
    agent.wait_for(&lb.pin_dir.join("links/xdp_up0"));
    agent.wait_for_log("VIP addresses on lo", 1);
    assert_eq!(pinned_ports(&lb), vec![80; 15]);

    agent.rewrite_config(&many_vips(&lb, 15, 81));
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reloaded", 1);
    assert_eq!(pinned_ports(&lb), vec![81; 15], "{}", agent.log_text());
    assert!(
        lb.metrics()
            .contains("vip_config_reloads_total{result=\"success\"} 1")
    );
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(), "{}", agent.log_text());

    // The datapath keeps the 15 VIPs on 81; a new agent wants them on 82.
    let mut restarted = Agent::start(&lb, &many_vips(&lb, 15, 82), &["--cleanup"]);
    restarted.wait_for_log("VIP addresses on lo", 1);
    assert_eq!(pinned_ports(&lb), vec![82; 15], "{}", restarted.log_text());
    restarted.signal(libc::SIGTERM);
    assert!(restarted.wait(), "{}", restarted.log_text());
}

/// A reload that does not fit (16 VIPs where 15 are live and the datapath has 16 table
/// slots: validation refuses it, as every VIP needs a spare) changes nothing.
#[test]
fn a_reload_that_does_not_fit_changes_nothing() {
    let (lb, _be) = Netns::lb_with_gateway("nofit");
    let mut agent = Agent::start(&lb, &many_vips(&lb, 15, 80), &["--cleanup"]);
    agent.wait_for_log("VIP addresses on lo", 1);
    agent.rewrite_config(&many_vips(&lb, 16, 81));
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reload rejected", 1);
    assert_eq!(pinned_ports(&lb), vec![80; 15]);
    assert!(
        lb.metrics()
            .contains("vip_config_reloads_total{result=\"failure\"} 1")
    );
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(), "{}", agent.log_text());
}

/// A metrics port that is taken fails start-up before anything on the node changed: no
/// program attached, no maps pinned, no VIP on `lo`.
#[test]
fn a_taken_metrics_port_fails_start_up_before_the_node_changes() {
    let (lb, _be) = Netns::lb_with_gateway("port");
    let _taken = lb.within(|| std::net::TcpListener::bind("127.0.0.1:7179").expect("bind"));
    let mut agent = Agent::start(&lb, &health_config(&lb, "1"), &[]);
    assert!(!agent.wait(), "the agent started: {}", agent.log_text());
    assert!(
        agent.log_text().contains("metrics address"),
        "{}",
        agent.log_text()
    );
    assert!(!lb.pin_dir.exists(), "pins were made");
    let lo = lb.ip(&["addr", "show", "dev", "lo"]);
    assert!(!lo.contains(VIP4), "{lo}");
}

/// Connections to the metrics address that send nothing are closed after the request timeout,
/// and a flood of them does not keep a scrape from being answered.
#[test]
fn idle_metrics_connections_are_closed_and_scrapes_still_answered() {
    use std::io::Read;
    let (lb, _be) = Netns::lb_with_gateway("idle");
    let mut agent = Agent::start(&lb, &health_config(&lb, "1"), &["--cleanup"]);
    agent.wait_for_log("serving /metrics", 1);
    let idle = lb.within(|| {
        (0..200)
            .map(|_| std::net::TcpStream::connect("127.0.0.1:7179").expect("connect"))
            .collect::<Vec<_>>()
    });
    let started = Instant::now();
    assert!(lb.metrics().contains("vip_config_reloads_total"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    thread::sleep(Duration::from_secs(3));
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            c.read(&mut buf).ok(),
            Some(0),
            "an idle connection stayed open"
        );
    }
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(), "{}", agent.log_text());
}

/// An interface that another XDP program holds: start-up fails and says how to see it.
#[test]
fn an_interface_held_by_another_xdp_program_is_named_with_how_to_see_it() {
    let (lb, _be) = Netns::lb_with_gateway("taken");
    let _other = lb.within(|| {
        let mut other = vip_agent::dataplane::DecapPlane::load(None).expect("load vip-decap");
        other
            .program()
            .expect("verified")
            .attach("up0", aya::programs::XdpMode::Skb)
            .expect("attach another program to up0");
        other
    });
    let mut agent = Agent::start(&lb, &health_config(&lb, "1"), &[]);
    assert!(!agent.wait(), "the agent started: {}", agent.log_text());
    let log = agent.log_text();
    assert!(
        log.contains("another XDP program is attached to up0") && log.contains("bpftool net show"),
        "{log}"
    );
}

/// `/metrics` passes `promtool check metrics` in the classic text format, and a scraper that
/// asks for OpenMetrics gets it, with its content type.
#[test]
fn metrics_pass_promtool_and_open_metrics_is_negotiated() {
    use std::io::{Read, Write};
    let (lb, _be) = Netns::lb_with_gateway("prom");
    let mut agent = Agent::start(&lb, &health_config(&lb, "1"), &["--cleanup"]);
    agent.wait_for_log("serving /metrics", 1);
    let get = |accept: &'static str| {
        lb.within(move || {
            let mut c = std::net::TcpStream::connect("127.0.0.1:7179").expect("metrics");
            write!(c, "GET /metrics HTTP/1.0\r\nAccept: {accept}\r\n\r\n").unwrap();
            let mut r = String::new();
            c.read_to_string(&mut r).unwrap();
            r
        })
    };
    // Once a check has run, its duration is in the histogram (the check runs every second).
    let checked = |t: &str| {
        t.lines().any(|l| {
            l.starts_with("vip_backend_check_duration_seconds_count{") && !l.ends_with(" 0")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = get("text/plain");
    while !checked(&text) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        text = get("text/plain");
    }
    assert!(checked(&text), "{text}");
    // Buckets count up to the total: `+Inf` holds every check.
    let value = |prefix: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix}: {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(
        value("vip_backend_check_duration_seconds_bucket{le=\"+Inf\""),
        value("vip_backend_check_duration_seconds_count{"),
        "{text}"
    );
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package, installed by `cargo xtask setup`)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "{problems}\n{body}"
    );
    let open = get("application/openmetrics-text; version=1.0.0,text/plain;q=0.5");
    let (head, body) = open.split_once("\r\n\r\n").expect("a response");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(), "{}", agent.log_text());
}

/// A reload applies the node's outer sources and conntrack insert limit, and refuses a map
/// size change naming the key that needs a restart.
#[test]
fn a_reload_applies_what_it_can_and_names_what_needs_a_restart() {
    let (lb, _be) = Netns::lb_with_gateway("live");
    let mut agent = Agent::start(&lb, &health_config(&lb, "1"), &["--cleanup"]);
    agent.wait_for_log("VIP addresses on lo", 1);
    let source = || {
        let maps = Dataplane::load(DataplaneOptions::from_pins(&lb.pin_dir).unwrap()).unwrap();
        maps.vips().unwrap()[0].1.src_v4
    };
    assert_eq!(source(), [198, 18, 0, 2]);
    let changed = health_config(&lb, "1")
        .replace("source_v4 = \"198.18.0.2\"", "source_v4 = \"198.18.0.3\"")
        .replace("[node]\n", "[node]\nconntrack_insert_limit = 1000\n");
    agent.rewrite_config(&changed);
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reloaded", 1);
    assert_eq!(source(), [198, 18, 0, 3]);
    agent.rewrite_config(&changed.replace("table_size = 251", "table_size = 257"));
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reload refused", 1);
    assert!(
        agent.log_text().contains("node.table_size"),
        "{}",
        agent.log_text()
    );
    let m = lb.metrics();
    assert!(m.contains("\nvip_config_last_reload_successful 0\n"), "{m}");
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(), "{}", agent.log_text());
}
