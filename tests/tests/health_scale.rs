//! 200 backends checked every second do not overload the agent: its CPU use is measured and
//! reported (one core = 100%).

use std::{net::TcpListener, thread, time::Duration};

use vip_tests::node::{Agent, Netns};

#[test]
fn two_hundred_backends_at_one_second_intervals() {
    // The "gateway" holds the 200 backend addresses itself.
    let (lb, be) = Netns::lb_with_gateway("scale");
    let mut config = format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.0.2\"\npin_dir = \"{}\"\n\
         table_size = 4099\nconntrack_entries = 4096\n\n[[vip]]\naddress = \"198.19.0.1\"\n\
         protocol = \"tcp\"\nport = 80\n[vip.health]\ncheck = \"tcp\"\ninterval = 1\ntimeout = 0.5\n",
        lb.pin_dir.display()
    );
    for i in 1..=200 {
        let addr = format!("198.18.128.{i}");
        be.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        config += &format!("[[vip.backend]]\naddress = \"{addr}\"\n");
    }
    // One listener answers for all 200 addresses.
    let listener = be.within(|| TcpListener::bind("0.0.0.0:80").expect("bind"));
    thread::spawn(move || for _ in listener.incoming() {});

    let mut agent = Agent::start(&lb, &config, &["--cleanup"]);
    agent.wait_for(&lb.pin_dir.join("links/xdp_up0"));
    thread::sleep(Duration::from_secs(3));
    let before = agent.cpu_time();
    thread::sleep(Duration::from_secs(10));
    let used = agent.cpu_time() - before;
    let share = used.as_secs_f64() / 10.0 * 100.0;
    let backends = lb.agent_cli(&["backends"]);
    let active = backends
        .lines()
        .filter(|l| l.contains(" active: ok in "))
        .count();
    eprintln!(
        "200 backends, TCP checks every 1 s: agent used {used:?} CPU in 10 s ({share:.1}% of a core); {active} healthy"
    );
    assert_eq!(active, 200, "{backends}");
    // 2,000 checks in 10 s; a few percent of a core is expected. The machine is shared and
    // noisy, so the bound is loose: a check storm (a busy loop, a thundering herd) is far above.
    assert!(share < 25.0, "the agent used {share:.1}% of a core");
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(), "{}", agent.log_text());
}
