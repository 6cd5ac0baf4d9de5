//! Recorded outer headers: an established flow's packets that leave with the headers recorded
//! from an earlier packet are byte for byte what a load balancer that never saw the flow
//! builds for them (lengths, TOS and checksums of their own, VLAN tags kept), and any change
//! the agent makes to a backend stops the replay at once.

use vip_common::IPPROTO_TCP;
use vip_tests::{fixture::*, packet::*};

/// A load balancer with `vip` over backend 0 at `backend`.
fn balancer(vip: &str, backend: &str) -> Lb {
    let mut lb = Lb::new();
    lb.backend(0, backend);
    lb.vip(&VipSpec::new(vip, IPPROTO_TCP, 80, &[0]));
    lb
}

/// Sends `first` twice through one load balancer (the first ACK records the flow, the next
/// packet its headers), then each of `next`; each output must equal a fresh load balancer's.
fn replayed_equal_built(vip: &str, backend: &str, first: &Frame, next: &[Frame]) {
    let mut lb = balancer(vip, backend);
    for _ in 0..2 {
        assert_eq!(lb.run(&first.build()).0, XDP_TX, "{first:?}");
    }
    for frame in next {
        let (action, replayed) = lb.run(&frame.build());
        let (fresh_action, built) = balancer(vip, backend).run(&frame.build());
        assert_eq!((action, fresh_action), (XDP_TX, XDP_TX), "{frame:?}");
        assert_eq!(
            replayed, built,
            "{frame:?}: replayed headers differ from built ones"
        );
    }
}

/// Later packets of the flow: longer, another TOS (ECN marked), both.
fn variants(first: &Frame) -> Vec<Frame> {
    let longer = Frame {
        payload: vec![0x5a; 700],
        ..first.clone()
    };
    vec![
        longer.clone(),
        first.clone().with_tos(0x03),
        longer.with_tos(0xb8),
        first.clone(),
    ]
}

#[test]
fn replayed_ipip_headers_equal_built_ones() {
    let first = Frame::tcp("198.18.50.1", 40000, "198.18.100.1", 80, TCP_ACK);
    replayed_equal_built("198.18.100.1", "198.18.1.1", &first, &variants(&first));
}

#[test]
fn replayed_ipip_headers_keep_each_frames_vlan_tag() {
    let first = Frame::tcp("198.18.50.1", 40001, "198.18.100.1", 80, TCP_ACK).with_vlan(100);
    let mut next = variants(&first);
    // Another tag on the same flow: the frame keeps its own.
    next.push(first.clone().with_vlan(200));
    replayed_equal_built("198.18.100.1", "198.18.1.1", &first, &next);
}

#[test]
fn replayed_ip6ip6_and_4in6_headers_equal_built_ones() {
    let first = Frame::tcp("fd00:50::1", 40002, "fd00:100::1", 80, TCP_ACK);
    replayed_equal_built("fd00:100::1", "fd00:1::1", &first, &variants(&first));
    let first = Frame::tcp("198.18.50.1", 40003, "198.18.100.1", 80, TCP_ACK);
    replayed_equal_built("198.18.100.1", "fd00:1::1", &first, &variants(&first));
}

#[test]
fn a_changed_backend_stops_the_replay_at_once() {
    let mut lb = balancer("198.18.100.1", "198.18.1.1");
    let ack = Frame::tcp("198.18.50.1", 40004, "198.18.100.1", 80, TCP_ACK).build();
    for _ in 0..3 {
        assert_eq!(lb.run(&ack).0, XDP_TX);
    }
    // The backend's next hop moves to another interface: the flow's next packet leaves there.
    lb.backend_via(0, "198.18.1.1", Some(TEST_RUN_IFINDEX + 1));
    assert_eq!(
        lb.run(&ack).0,
        XDP_REDIRECT,
        "the recorded headers were replayed"
    );
    lb.backend(0, "198.18.1.1");
    assert_eq!(lb.run(&ack).0, XDP_TX);
    assert_eq!(lb.run(&ack).0, XDP_TX);
    // Removed: the flow's packets have no backend left.
    lb.remove_backend(0);
    let (action, _) = lb.run(&ack);
    assert_ne!(action, XDP_TX, "the recorded headers were replayed");
}
