//! Announcer mode `kernel`: vip writes each VIP it can forward as a route in a kernel table, and
//! BIRD on the LB node learns that table and announces it to the router. The route follows the
//! VIP: present while forwardable, gone when every backend fails, gone after a drain's time.
//!
//! ```text
//!   ns rt (router: BIRD AS 65000; the backend's service) ── r1 ── up0 ── ns lb (vip-agent,
//!                                                                  BIRD AS 65001 learning table 100)
//! ```

use std::{
    thread,
    time::{Duration, Instant},
};

use vip_tests::{
    node::{Agent, Netns, TcpService},
    router::Bird,
};

const VIP4: &str = "198.19.0.1";
const BACKEND: &str = "198.18.1.1";

fn agent_config(lb: &Netns) -> String {
    format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.1.2\"\npin_dir = \"{}\"\n\
         table_size = 251\nconntrack_entries = 4096\n\
         [announce]\nmode = \"kernel\"\ntable = 100\ndrain_time = 2\n\
         [[vip]]\naddress = \"{VIP4}\"\nprotocol = \"tcp\"\nport = 80\n\
         [vip.health]\ncheck = \"tcp\"\nport = 8080\ninterval = 0.2\ntimeout = 0.1\nrise = 1\nfall = 2\n\
         [[vip.backend]]\naddress = \"{BACKEND}\"\n",
        lb.pin_dir.display()
    )
}

/// BIRD on the LB node: learns vip's routes from table 100 (protocol 118) and exports them.
const LB_BIRD: &str = "router id 198.18.1.2;\nprotocol device {}\n\
    protocol kernel vip { ipv4 { import all; export none; }; kernel table 100; learn; scan time 1; }\n\
    protocol bgp uplink { local 198.18.1.2 as 65001; neighbor 198.18.1.1 as 65000; hold time 3; \
    connect retry time 1; ipv4 { import none; export where proto = \"vip\"; }; }\n";

const ROUTER_BIRD: &str = "router id 198.18.1.1;\nprotocol device {}\n\
    protocol bgp lb { local 198.18.1.1 as 65000; neighbor 198.18.1.2 as 65001; hold time 3; \
    connect retry time 1; ipv4 { import all; export none; }; }\n";

fn router_has_vip(router: &Bird) -> bool {
    router.cli("show route").contains(VIP4)
}

#[test]
fn kernel_routes_follow_the_vip_for_a_routing_daemon_to_announce() {
    let rt = Netns::new("krt");
    let lb = Netns::new("klb");
    rt.link(("r1", "198.18.1.1/24"), &lb, ("up0", "198.18.1.2/24"));

    let service = TcpService::start(&rt, BACKEND, 8080);
    let mut agent = Agent::start(&lb, &agent_config(&lb), &["--cleanup"]);
    let _lb_bird = Bird::start(&lb, LB_BIRD);
    let router = Bird::start(&rt, ROUTER_BIRD);
    router.wait_for(router_has_vip, "the VIP, learned from the kernel table");
    let table = lb.ip(&["route", "show", "table", "100"]);
    assert!(
        table.contains(&format!("{VIP4} dev lo proto 118")),
        "{table}"
    );

    // Every backend fails: the VIP cannot be forwarded, its route goes.
    drop(service);
    router.wait_for(
        |r| !router_has_vip(r),
        "the route gone with the last backend",
    );
    let _service = TcpService::start(&rt, BACKEND, 8080);
    router.wait_for(router_has_vip, "the route back with the backend");

    // A drain keeps the route for the drain time (2 s), then removes it.
    let drained = lb.agent_cli(&["drain"]);
    assert!(drained.contains("node drained"), "{drained}");
    let start = Instant::now();
    thread::sleep(Duration::from_millis(800));
    assert!(
        router_has_vip(&router),
        "the route went before the drain time"
    );
    router.wait_for(
        |r| !router_has_vip(r),
        "the route gone after the drain time",
    );
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert!(lb.agent_cli(&["undrain"]).contains("node undrained"));
    router.wait_for(router_has_vip, "the route back after undrain");

    // Stopping: the route stays for the drain time, then goes; vip's table is left empty.
    agent.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(800));
    assert!(
        router_has_vip(&router),
        "the route went before the drain time"
    );
    router.wait_for(|r| !router_has_vip(r), "the route gone after stopping");
    assert!(agent.wait(), "{}", agent.log_text());
    assert!(!lb.ip(&["route", "show", "table", "100"]).contains(VIP4));
}
