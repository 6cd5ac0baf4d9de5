//! Backends without a resolved next hop: the datapath asks the kernel's FIB. With no neighbour
//! entry yet it passes the packet to the stack (which resolves it) and counts it; once the
//! neighbour is known it sends the frame itself with the FIB's MACs.
//!
//! Each test runs in its own network namespace (gone when the test thread ends).

use vip_common::IPPROTO_TCP;
use vip_tests::{fixture::*, packet::*};

const GW_MAC: &str = "02:00:00:00:00:aa";

/// A veth pair in a private netns: `vipfib0` is the LB's uplink, with a route to the backends.
fn uplink() -> (u32, [u8; 6]) {
    private_netns();
    ip(&[
        "link", "add", "vipfib0", "type", "veth", "peer", "name", "vipfib1",
    ]);
    ip(&["link", "set", "vipfib0", "up"]);
    ip(&["link", "set", "vipfib1", "up"]);
    // bpf_fib_lookup answers only for interfaces that forward; an LB node's uplink does.
    // /proc/sys/net shows the namespace of the thread that opens it.
    for family in ["ipv4", "ipv6"] {
        let knob = format!("/proc/sys/net/{family}/conf/vipfib0/forwarding");
        std::fs::write(&knob, "1").unwrap_or_else(|e| panic!("{knob}: {e}"));
    }
    ip(&["addr", "add", "198.18.0.2/24", "dev", "vipfib0"]);
    ip(&["addr", "add", "fd00:18::2/64", "dev", "vipfib0", "nodad"]);
    ip(&["route", "add", "198.18.1.0/24", "via", "198.18.0.1"]);
    ip(&["route", "add", "fd00:1::/64", "via", "fd00:18::1"]);
    // /sys shows the root namespace's devices; ask this namespace.
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"vipfib0".as_ptr()) };
    assert_ne!(ifindex, 0, "vipfib0 has an ifindex");
    let brief = ip(&["-br", "link", "show", "dev", "vipfib0"]);
    let mac = brief.split_whitespace().nth(2).expect("MAC column");
    (ifindex, parse_mac(mac))
}

fn parse_mac(s: &str) -> [u8; 6] {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("6 bytes")
}

#[test]
fn fib_lookup_without_and_with_a_neighbour() {
    let (ifindex, uplink_mac) = uplink();
    let mut lb = Lb::new();
    lb.backend_via(0, "198.18.1.1", None)
        .backend_via(1, "fd00:1::1", None);
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0]));
    lb.vip(&VipSpec::new("fd00:100::1", IPPROTO_TCP, 80, &[1]));
    let frames = [
        Frame::tcp("198.18.50.1", 1000, "198.18.100.1", 80, TCP_SYN),
        Frame::tcp("fd00:50::1", 1000, "fd00:100::1", 80, TCP_SYN),
    ];

    // No neighbour for the gateways yet: encapsulated, passed to the stack, counted.
    for f in &frames {
        let (action, out) = lb.run_on(&f.build(), ifindex);
        assert_eq!(action, XDP_PASS, "{f:?}");
        assert_eq!(decode_encapsulated(&out).inner, f.ip_packet());
    }
    let stats = lb.dataplane.stats().unwrap();
    assert_eq!((stats.no_neighbour_passed, stats.no_route_passed), (2, 0));

    // The kernel knows the gateways now: the datapath forwards with the FIB's MACs.
    for gateway in ["198.18.0.1", "fd00:18::1"] {
        ip(&[
            "neigh",
            "replace",
            gateway,
            "lladdr",
            GW_MAC,
            "dev",
            "vipfib0",
            "nud",
            "permanent",
        ]);
    }
    for f in &frames {
        let (action, out) = lb.run_on(&f.build(), ifindex);
        assert_eq!(action, XDP_TX, "{f:?}");
        let e = decode_encapsulated(&out);
        assert_eq!(e.dst_mac, parse_mac(GW_MAC));
        assert_eq!(e.src_mac, uplink_mac);
        assert_eq!(e.inner, f.ip_packet());
    }
    assert_eq!(lb.dataplane.stats().unwrap().tx, 2);
}

#[test]
fn no_route_to_the_backend_passes_and_counts() {
    let (ifindex, _) = uplink();
    let mut lb = Lb::new();
    lb.backend_via(0, "203.0.113.1", None);
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0]));
    let f = Frame::tcp("198.18.50.1", 1000, "198.18.100.1", 80, TCP_SYN);
    let (action, _) = lb.run_on(&f.build(), ifindex);
    assert_eq!(action, XDP_PASS);
    let stats = lb.dataplane.stats().unwrap();
    assert_eq!((stats.no_neighbour_passed, stats.no_route_passed), (0, 1));
}
