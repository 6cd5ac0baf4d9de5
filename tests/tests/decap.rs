//! The backends' decapsulation program, fed with the load balancer's real output: every
//! encapsulation the LB produces comes back out as exactly the client's frame.

use vip_common::{DecapStats, IPPROTO_TCP, IPPROTO_UDP};
use vip_tests::{fixture::*, packet::*};

const BACKEND4: &str = "198.18.1.1";
const BACKEND6: &str = "fd00:1::1";

/// An LB whose VIPs all go to this one backend (IPv4 or IPv6).
fn lb() -> Lb {
    let mut lb = Lb::new();
    lb.backend(0, BACKEND4).backend(1, BACKEND6);
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0]));
    lb.vip(&VipSpec::new("fd00:100::1", IPPROTO_TCP, 80, &[1]));
    lb.vip(&VipSpec::new("198.18.100.2", IPPROTO_UDP, 53, &[1])); // 4in6
    lb.vip(&VipSpec::new("fd00:100::2", IPPROTO_UDP, 53, &[0])); // 6in4
    lb
}

fn decap() -> Decap {
    Decap::new(
        &[BACKEND4, BACKEND6],
        &["198.18.100.1", "fd00:100::1", "198.18.100.2", "fd00:100::2"],
    )
}

/// The frame the backend's stack must see: the LB's L2 header, the client's IP packet.
fn expected(encapsulated: &[u8], client: &Frame) -> Vec<u8> {
    let l2 = if client.vlan.is_some() { 18 } else { 14 };
    let mut f = encapsulated[..l2].to_vec();
    let ether_type: [u8; 2] = if client.src.is_ipv4() {
        [0x08, 0x00]
    } else {
        [0x86, 0xdd]
    };
    f[l2 - 2..l2].copy_from_slice(&ether_type);
    f.extend_from_slice(&client.ip_packet());
    f
}

fn counter(d: &Decap, f: fn(&DecapStats) -> u64) -> u64 {
    f(&d.plane.stats().unwrap())
}

#[test]
fn every_encapsulation_is_stripped_back_to_the_clients_packet() {
    let mut lb = lb();
    let mut d = decap();
    let frames = [
        (
            "IPIP",
            Frame::tcp("198.18.50.1", 1000, "198.18.100.1", 80, TCP_SYN).with_tos(0x10),
        ),
        (
            "IP6IP6",
            Frame::tcp("fd00:50::1", 1000, "fd00:100::1", 80, TCP_ACK),
        ),
        ("4in6", Frame::udp("198.18.50.1", 1000, "198.18.100.2", 53)),
        ("6in4", Frame::udp("fd00:50::1", 1000, "fd00:100::2", 53)),
        (
            "IPIP, VLAN",
            Frame::tcp("198.18.50.1", 1001, "198.18.100.1", 80, TCP_SYN).with_vlan(5),
        ),
    ];
    for (i, (name, client)) in frames.iter().enumerate() {
        let (action, encapsulated) = lb.run(&client.build());
        assert_eq!(action, XDP_TX, "{name}: LB forwards");
        let (action, out) = d.run(&encapsulated);
        assert_eq!(action, XDP_PASS, "{name}");
        assert_eq!(
            out,
            expected(&encapsulated, client),
            "{name}: client's frame restored"
        );
        assert_eq!(counter(&d, |s| s.decapsulated), i as u64 + 1);
    }
}

#[test]
fn packets_not_for_this_backend_pass_untouched() {
    let mut lb = lb();
    let client = Frame::tcp("198.18.50.1", 1000, "198.18.100.1", 80, TCP_SYN);
    let (_, encapsulated) = lb.run(&client.build());

    // Another backend's decap: outer destination is not local.
    let mut other = Decap::new(&["198.18.1.99"], &["198.18.100.1"]);
    let (action, out) = other.run(&encapsulated);
    assert_eq!((action, &out), (XDP_PASS, &encapsulated));
    assert_eq!(counter(&other, |s| s.refused_not_local), 1);

    // Right backend, but it does not serve that VIP.
    let mut no_vip = Decap::new(&[BACKEND4], &["198.18.100.7"]);
    let (action, out) = no_vip.run(&encapsulated);
    assert_eq!((action, &out), (XDP_PASS, &encapsulated));
    assert_eq!(counter(&no_vip, |s| s.refused_not_vip), 1);

    // Plain traffic, ARP, truncated inner headers.
    let mut d = decap();
    let plain = client.build();
    assert_eq!(d.run(&plain), (XDP_PASS, plain.clone()));
    let arp = ethernet(None, 0x0806, &[0u8; 28]);
    assert_eq!(d.run(&arp), (XDP_PASS, arp.clone()));
    for cut in 34..encapsulated.len().min(54) {
        let truncated = &encapsulated[..cut];
        let (action, out) = d.run(truncated);
        assert_eq!(
            (action, out.as_slice()),
            (XDP_PASS, truncated),
            "cut at {cut}"
        );
    }
    let s = d.plane.stats().unwrap();
    assert_eq!(s.decapsulated, 0);
    assert!(s.refused_malformed > 0);
}

#[test]
fn gue_is_stripped_on_its_port_only() {
    let mut lb = Lb::new();
    lb.backend(0, BACKEND4).backend(1, BACKEND6);
    for (vip, backend) in [("198.18.100.1", 0), ("fd00:100::1", 1), ("198.18.100.2", 1)] {
        let mut spec = VipSpec::new(vip, IPPROTO_TCP, 80, &[backend]);
        spec.gue_port = Some(6080);
        lb.vip(&spec);
    }
    let mut d = decap();
    d.plane.set_gue_port(Some(6080)).unwrap();
    for client in [
        Frame::tcp("198.18.50.1", 1000, "198.18.100.1", 80, TCP_SYN),
        Frame::tcp("fd00:50::1", 1000, "fd00:100::1", 80, TCP_SYN),
        Frame::tcp("198.18.50.1", 1000, "198.18.100.2", 80, TCP_SYN).with_vlan(3),
    ] {
        let (action, encapsulated) = lb.run(&client.build());
        assert_eq!(action, XDP_TX);
        assert!(
            decode_encapsulated(&encapsulated).udp.is_some(),
            "GUE expected"
        );
        let (action, out) = d.run(&encapsulated);
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, expected(&encapsulated, &client));
    }
    assert_eq!(counter(&d, |s| s.decapsulated), 3);

    // Another port is ordinary UDP: untouched.
    d.plane.set_gue_port(Some(6081)).unwrap();
    let (_, encapsulated) =
        lb.run(&Frame::tcp("198.18.50.1", 2000, "198.18.100.1", 80, TCP_SYN).build());
    assert_eq!(d.run(&encapsulated), (XDP_PASS, encapsulated.clone()));
    assert_eq!(counter(&d, |s| s.decapsulated), 3);
}
