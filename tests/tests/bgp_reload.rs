//! BGP settings changed by a reload, against real BIRD: each peer's session is on its own, so
//! adding, removing or changing one touches no other, new route attributes are re-announced
//! without a reset, and what only a restart applies (map sizes) is refused by name.
//!
//! Two routers, each running BIRD: `rt` (198.18.1.1, the peering lab's) and `rt2`
//! (198.18.9.1, on a second link of the LB node).

use vip_tests::{
    node::{Agent, Netns},
    peering::{VIP4, bird_config, established, lb_config, topology},
    router::Bird,
};

const SECOND: &str = "198.18.9.1";

/// A second router on a link of its own to `lb` (`up1`, 198.18.9.2), with BIRD peering as
/// protocol `lb1`.
fn second_router(lb: &Netns) -> (Netns, Bird) {
    let rt2 = Netns::new("rt2");
    rt2.link(("r1", "198.18.9.1/24"), lb, ("up1", "198.18.9.2/24"));
    let bird = Bird::start(
        &rt2,
        &bird_config(1, None)
            .replace("198.18.1.1", "198.18.9.1")
            .replace("198.18.1.2", "198.18.9.2"),
    );
    (rt2, bird)
}

/// The agent's config with these peers (all in AS 65000) and `extra` under `[bgp]`.
fn config(lb: &Netns, peers: &[&str], extra: &str) -> String {
    let base = lb_config(lb, 1, extra, &[VIP4]);
    let first = "[[bgp.peer]]\naddress = \"198.18.1.1\"\nasn = 65000\n";
    let peers: String = peers
        .iter()
        .map(|p| format!("[[bgp.peer]]\naddress = \"{p}\"\nasn = 65000\n"))
        .collect();
    base.replace(first, &peers)
}

/// How often the agent's log says the session with `peer` came up.
fn established_count(agent: &Agent, peer: &str) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains("BGP session established") && l.contains(&format!("peer={peer}")))
        .count()
}

fn reload(agent: &mut Agent, text: &str, reloads: usize) {
    agent.rewrite_config(text);
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reloaded", reloads);
}

#[test]
fn a_reload_adds_and_removes_peers_without_touching_the_others() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &bird_config(1, None));
    let (_rt2, bird2) = second_router(&lbs[0]);
    let mut agent = Agent::start(&lbs[0], &config(&lbs[0], &["198.18.1.1"], ""), &[]);
    bird.wait_for(|b| established(b, "lb1"), "the first session");
    bird.wait_for(
        |b| b.cli("show route protocol lb1").contains(VIP4),
        "its route",
    );
    assert!(!established(&bird2, "lb1"));

    reload(&mut agent, &config(&lbs[0], &["198.18.1.1", SECOND], ""), 1);
    bird2.wait_for(|b| established(b, "lb1"), "the added peer's session");
    bird2.wait_for(
        |b| b.cli("show route protocol lb1").contains(VIP4),
        "the route to the added peer",
    );
    assert_eq!(
        established_count(&agent, "198.18.1.1"),
        1,
        "{}",
        agent.log_text()
    );

    reload(&mut agent, &config(&lbs[0], &[SECOND], ""), 2);
    bird.wait_for(
        |b| !established(b, "lb1"),
        "the removed peer's session down",
    );
    let lb1 = bird.cli("show protocols all lb1");
    assert!(lb1.contains("Peer de-configured"), "{lb1}");
    assert!(!bird.cli("show route protocol lb1").contains(VIP4));
    assert!(established(&bird2, "lb1"));
    assert!(bird2.cli("show route protocol lb1").contains(VIP4));
    assert_eq!(established_count(&agent, SECOND), 1, "{}", agent.log_text());
    let pins = lbs[0].pin_dir.to_string_lossy().into_owned();
    let status = lbs[0].agent_cli(&["status", "--pin-dir", &pins]);
    assert!(
        status.contains(&format!("bgp peer {SECOND}: Established"))
            && !status.contains("198.18.1.1:"),
        "{status}"
    );
}

#[test]
fn a_reload_reannounces_new_attributes_and_resets_only_a_changed_session() {
    let (rt, lbs) = topology(1);
    let bird = Bird::start(&rt, &bird_config(1, None));
    let (_rt2, bird2) = second_router(&lbs[0]);
    let peers = ["198.18.1.1", SECOND];
    let mut agent = Agent::start(&lbs[0], &config(&lbs[0], &peers, ""), &[]);
    for b in [&bird, &bird2] {
        b.wait_for(
            |b| b.cli("show route protocol lb1").contains(VIP4),
            "both sessions' routes",
        );
    }

    // Node-wide communities, a MED and an IPv4 next hop: the routes again, no session reset.
    let attributes = config(&lbs[0], &peers, "next_hop_v4 = \"198.18.1.9\"\n")
        .replace(
            "communities = [\"65001:100\"]",
            "communities = [\"65001:200\"]\n",
        )
        .replace("[[vip.backend]]", "med = 42\n[[vip.backend]]");
    reload(&mut agent, &attributes, 1);
    bird.wait_for(
        |b| {
            b.cli(&format!("show route {VIP4}/32"))
                .contains("via 198.18.1.9")
        },
        "the new next hop",
    );
    // (The second router cannot reach that next hop, so only the first shows the route.)
    bird.wait_for(
        |b| {
            let r = b.cli("show route protocol lb1 all");
            r.contains("(65001,200)") && r.contains("BGP.med: 42")
        },
        "the new attributes",
    );
    assert_eq!(established_count(&agent, "198.18.1.1"), 1);
    assert_eq!(established_count(&agent, SECOND), 1);

    // One peer's hold time: that session alone starts again, with Cease / other configuration
    // change.
    let hold = attributes.replace(
        &format!("address = \"{SECOND}\"\nasn = 65000\n"),
        &format!("address = \"{SECOND}\"\nasn = 65000\nhold_time = 6\n"),
    );
    reload(&mut agent, &hold, 2);
    agent.wait_for_log("BGP session restarts with its new settings", 1);
    agent.wait_for_log("BGP session established", 3);
    bird2.wait_for(|b| established(b, "lb1"), "the changed session back");
    assert_eq!(established_count(&agent, SECOND), 2, "{}", agent.log_text());
    assert_eq!(
        established_count(&agent, "198.18.1.1"),
        1,
        "{}",
        agent.log_text()
    );

    // A map size only a restart applies: refused by name, nothing changed.
    let bigger = hold.replace("conntrack_entries = 4096", "conntrack_entries = 8192");
    agent.rewrite_config(&bigger);
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reload refused", 1);
    let log = agent.log_text();
    assert!(log.contains("node.conntrack_entries"), "{log}");
    assert!(established(&bird, "lb1") && established(&bird2, "lb1"));
}
