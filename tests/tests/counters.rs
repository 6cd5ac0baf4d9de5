//! Traffic counters as the agent reports them: the datapath counts per backend of a VIP only,
//! and a VIP's traffic is the sum over its backends, including those that have left it, so
//! the exported per-VIP counters never fall. A released backend id starts again from zero.

use std::{collections::HashMap, path::Path};

use vip_agent::{
    apply::{Applied, Capacity, Target},
    config,
    dataplane::{Dataplane, DataplaneOptions},
};
use vip_tests::{fixture::run_dataplane, packet::*};

const VIP: &str = "tcp/198.19.0.1:80";

/// The agent's applied state and the datapath it writes.
struct Balancer {
    applied: Applied,
    dataplane: Dataplane,
}

fn apply(balancer: &mut Balancer, backends: &[&str]) {
    let mut text = "[node]\ninterfaces = [\"lo\"]\nsource_v4 = \"198.18.0.2\"\ntable_size = 251\n\
                    [[vip]]\naddress = \"198.19.0.1\"\nprotocol = \"tcp\"\nport = 80\n"
        .to_owned();
    for b in backends {
        text += &format!("[[vip.backend]]\naddress = \"{b}\"\n");
    }
    let config = config::parse(Path::new("counters.toml"), &text).expect("valid config");
    balancer
        .applied
        .apply(
            &Target::configured(&config),
            &HashMap::new(),
            &mut balancer.dataplane,
        )
        .expect("applied");
}

/// `count` SYNs of distinct flows to the VIP.
fn send(balancer: &mut Balancer, count: u16, first_port: u16) {
    for port in first_port..first_port + count {
        let syn = Frame::tcp("198.18.50.1", port, "198.19.0.1", 80, TCP_SYN);
        run_dataplane(&mut balancer.dataplane, &syn.build());
    }
}

/// (VIP packets, packets per backend address).
fn report(balancer: &Balancer) -> (u64, Vec<(String, u64)>) {
    let accounts = balancer.applied.accounts();
    let account = accounts
        .iter()
        .find(|a| a.name.to_string() == VIP)
        .expect("the VIP");
    let mut vip = account.retired.packets;
    let mut backends = Vec::new();
    for (addr, id) in &account.backends {
        let sent = balancer.dataplane.backend_traffic(*id).expect("traffic");
        vip += sent.packets;
        backends.push((addr.to_string(), sent.packets));
    }
    (vip, backends)
}

#[test]
fn a_vips_traffic_survives_its_backends_and_reused_ids_start_at_zero() {
    vip_tests::require_root();
    // Room for two backends: the third one must take the id the second one leaves.
    let dataplane = Dataplane::load(DataplaneOptions {
        table_size: 251,
        max_backends: 2,
        ..DataplaneOptions::default()
    })
    .expect("load");
    let mut balancer = Balancer {
        applied: Applied::new(Capacity::from(dataplane.options())),
        dataplane,
    };
    apply(&mut balancer, &["198.18.1.1", "198.18.1.2"]);
    send(&mut balancer, 100, 10_000);
    let (vip, backends) = report(&balancer);
    assert_eq!(vip, 100);
    assert_eq!(backends.iter().map(|(_, p)| p).sum::<u64>(), 100);
    assert!(backends.iter().all(|(_, p)| *p > 0), "{backends:?}");
    let kept = backends.iter().find(|(a, _)| a == "198.18.1.1").unwrap().1;

    // One backend leaves: the VIP keeps what it sent.
    apply(&mut balancer, &["198.18.1.1"]);
    assert_eq!(report(&balancer).0, 100, "the VIP's count fell");

    // A new backend takes the released id: it starts from zero.
    apply(&mut balancer, &["198.18.1.1", "198.18.1.3"]);
    let (vip, backends) = report(&balancer);
    assert_eq!(vip, 100);
    assert_eq!(
        backends,
        vec![
            ("198.18.1.1".to_owned(), kept),
            ("198.18.1.3".to_owned(), 0)
        ]
    );
    send(&mut balancer, 50, 20_000);
    assert_eq!(report(&balancer).0, 150);
}
