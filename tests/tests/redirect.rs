//! Frames whose next hop is on another interface than the one they arrived on leave by a
//! redirect through `TX_PORTS`; the others by XDP_TX. Sent for real (live frames) through veths
//! in the test's own network namespace.

use vip_common::IPPROTO_TCP;
use vip_tests::{
    fixture::*,
    live::{DOWNLINK, Links, UPLINK, run_live},
    packet::*,
};

#[test]
fn frames_leave_by_their_next_hops_interface() {
    let links = Links::new();
    let mut lb = Lb::new();
    lb.backend_via(0, "198.18.1.1", Some(links.downlink))
        .backend_via(1, "198.18.1.2", Some(links.uplink));
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0]));
    lb.vip(&VipSpec::new("198.18.100.2", IPPROTO_TCP, 80, &[1]));
    let mut ports = vec![links.uplink, links.downlink];
    ports.sort_unstable();
    assert_eq!(
        lb.dataplane.tx_ports().unwrap(),
        ports,
        "the agent put both next hops' interfaces into TX_PORTS"
    );

    let before = (links.received(DOWNLINK), links.received(UPLINK));
    let to_downlink = Frame::tcp("198.18.50.1", 40000, "198.18.100.1", 80, TCP_SYN).build();
    let to_uplink = Frame::tcp("198.18.50.1", 40000, "198.18.100.2", 80, TCP_SYN).build();
    let program = lb.dataplane.program().unwrap();
    // One batch per run: the kernel does not restore a recycled frame.
    for _ in 0..2 {
        run_live(program, &to_downlink, links.uplink, 50);
    }
    run_live(program, &to_uplink, links.uplink, 50);
    assert_eq!(
        (
            links.received(DOWNLINK) - before.0,
            links.received(UPLINK) - before.1
        ),
        (100, 50),
        "frames that reached the far ends (downlink: redirected, uplink: XDP_TX)"
    );
    let stats = lb.dataplane.stats().unwrap();
    assert_eq!((stats.redirected, stats.tx), (100, 50));
}
