//! Table-driven packet tests through BPF_PROG_TEST_RUN: frame in, action and frame out.
//!
//! One table per feature. Every encapsulated output is checked field by field against what the
//! configuration says (backend from userspace Maglev, outer source, protocol, TTL, TOS, MACs,
//! VLAN tag, checksum) and its inner packet byte for byte against the input.

use std::net::IpAddr;

use vip_common::{BackendId, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP};
use vip_tests::{fixture::*, packet::*, rows::*};

/// The rows the benchmark times do what they should.
#[test]
fn timed_rows() {
    let mut s = services();
    let rows = vip_tests::rows::timed_rows(&s);
    run_table(&mut s, rows);
}

#[test]
fn ipv4_tcp_and_udp() {
    let mut s = services();
    let (web4, dns4) = (s.web4.clone(), s.dns4.clone());
    let rows = vec![
        Row {
            name: "SYN",
            frame: Frame::tcp(CLIENT4, 40000, "198.18.100.1", 80, TCP_SYN),
            expect: Expect::Encap(web4.clone()),
        },
        Row {
            name: "established (ACK, no conntrack entry yet)",
            frame: Frame::tcp(CLIENT4, 40001, "198.18.100.1", 80, TCP_ACK),
            expect: Expect::Encap(web4.clone()),
        },
        Row {
            name: "established after SYN",
            frame: Frame::tcp(CLIENT4, 40000, "198.18.100.1", 80, TCP_ACK),
            expect: Expect::Encap(web4.clone()),
        },
        Row {
            name: "UDP",
            frame: Frame::udp(CLIENT4, 5353, "198.18.100.1", 53),
            expect: Expect::Encap(dns4.clone()),
        },
        Row {
            name: "TOS copied",
            frame: Frame::tcp(CLIENT4, 40002, "198.18.100.1", 80, TCP_SYN).with_tos(0xb8),
            expect: Expect::Encap(web4.clone()),
        },
        Row {
            name: "large payload",
            frame: Frame {
                payload: vec![0xab; 1400],
                ..Frame::udp(CLIENT4, 5354, "198.18.100.1", 53)
            },
            expect: Expect::Encap(dns4.clone()),
        },
    ];
    run_table(&mut s, rows);
}

#[test]
fn ipv6_tcp_and_udp() {
    let mut s = services();
    let (web6, dns6) = (s.web6.clone(), s.dns6.clone());
    run_table(
        &mut s,
        vec![
            Row {
                name: "IPv6 SYN",
                frame: Frame::tcp(CLIENT6, 40000, "fd00:100::1", 443, TCP_SYN),
                expect: Expect::Encap(web6.clone()),
            },
            Row {
                name: "IPv6 established",
                frame: Frame::tcp(CLIENT6, 40000, "fd00:100::1", 443, TCP_ACK),
                expect: Expect::Encap(web6.clone()),
            },
            Row {
                name: "IPv6 UDP",
                frame: Frame::udp(CLIENT6, 5353, "fd00:100::1", 53),
                expect: Expect::Encap(dns6.clone()),
            },
            Row {
                name: "IPv6 traffic class copied",
                frame: Frame::tcp(CLIENT6, 40001, "fd00:100::1", 443, TCP_SYN).with_tos(0x2e),
                expect: Expect::Encap(web6.clone()),
            },
        ],
    );
}

#[test]
fn mixed_families() {
    let mut s = services();
    let (v4_over_v6, v6_over_v4) = (s.v4_over_v6.clone(), s.v6_over_v4.clone());
    run_table(
        &mut s,
        vec![
            Row {
                name: "IPv4 client to IPv6 backends (4in6)",
                frame: Frame::tcp(CLIENT4, 40000, "198.18.100.3", 80, TCP_SYN).with_tos(0x10),
                expect: Expect::Encap(v4_over_v6.clone()),
            },
            Row {
                name: "IPv6 client to IPv4 backends (6in4)",
                frame: Frame::tcp(CLIENT6, 40000, "fd00:100::3", 80, TCP_SYN),
                expect: Expect::Encap(v6_over_v4.clone()),
            },
        ],
    );
}

#[test]
fn vlan_tagged() {
    let mut s = services();
    let (web4, web6) = (s.web4.clone(), s.web6.clone());
    run_table(
        &mut s,
        vec![
            Row {
                name: "802.1Q IPv4",
                frame: Frame::tcp(CLIENT4, 40000, "198.18.100.1", 80, TCP_SYN).with_vlan(42),
                expect: Expect::Encap(web4.clone()),
            },
            Row {
                name: "802.1Q IPv6",
                frame: Frame::tcp(CLIENT6, 40000, "fd00:100::1", 443, TCP_SYN).with_vlan(4094),
                expect: Expect::Encap(web6.clone()),
            },
            Row {
                name: "802.1Q not a VIP",
                frame: Frame::tcp(CLIENT4, 40000, "198.18.100.9", 80, TCP_SYN).with_vlan(42),
                expect: Expect::Pass,
            },
        ],
    );
}

#[test]
fn all_ports_vip() {
    let mut s = services();
    let (all, web4) = (s.all_ports4.clone(), s.web4.clone());
    run_table(
        &mut s,
        vec![
            Row {
                name: "port 1",
                frame: Frame::tcp(CLIENT4, 40000, "198.18.100.2", 1, TCP_SYN),
                expect: Expect::Encap(all.clone()),
            },
            Row {
                name: "port 65535",
                frame: Frame::tcp(CLIENT4, 40000, "198.18.100.2", 65535, TCP_SYN),
                expect: Expect::Encap(all.clone()),
            },
            Row {
                name: "UDP to a TCP all-ports VIP",
                frame: Frame::udp(CLIENT4, 40000, "198.18.100.2", 80),
                expect: Expect::Pass,
            },
            Row {
                name: "exact port wins over nothing else: web VIP still exact",
                frame: Frame::tcp(CLIENT4, 40000, "198.18.100.1", 80, TCP_SYN),
                expect: Expect::Encap(web4.clone()),
            },
            Row {
                name: "other port of a port-specific VIP",
                frame: Frame::tcp(CLIENT4, 40000, "198.18.100.1", 81, TCP_SYN),
                expect: Expect::Pass,
            },
        ],
    );
}

#[test]
fn not_for_a_vip_passes_untouched() {
    let mut s = services();
    let mut arp = ethernet(None, 0x0806, &[0u8; 28]);
    arp[14] = 0;
    let icmp_echo = Frame {
        proto: 1,
        ..Frame::udp(CLIENT4, 0, "198.18.100.1", 0)
    };
    let mut ipv6_ext = Frame::tcp(CLIENT6, 40000, "fd00:100::1", 443, TCP_SYN);
    ipv6_ext.proto = 0; // hop-by-hop options header
    let sctp = Frame {
        proto: 132,
        ..Frame::udp(CLIENT4, 1, "198.18.100.1", 53)
    };
    // A router's BFD Control packet to this node (RFC 5881: port 3784, source port 49152+).
    let bfd = vip_agent::bfd::packet::encode(&vip_agent::bfd::packet::Control {
        diag: vip_agent::bfd::packet::Diag::None,
        state: vip_agent::bfd::packet::State::Up,
        poll: false,
        final_: false,
        detect_mult: 3,
        my_discriminator: 1,
        your_discriminator: 2,
        desired_min_tx_us: 100_000,
        required_min_rx_us: 100_000,
    });
    let bfd_to = |src: &str, dst: &str| Frame {
        payload: bfd.to_vec(),
        ..Frame::udp(src, 49152, dst, vip_agent::bfd::PORT)
    };
    run_table(
        &mut s,
        vec![
            Row {
                name: "other address",
                frame: Frame::tcp(CLIENT4, 40000, "198.18.100.99", 80, TCP_SYN),
                expect: Expect::Pass,
            },
            Row {
                name: "other protocol on a VIP address (ICMP echo)",
                frame: icmp_echo,
                expect: Expect::Pass,
            },
            Row {
                name: "SCTP to a VIP address",
                frame: sctp,
                expect: Expect::Pass,
            },
            Row {
                name: "IPv6 extension header",
                frame: ipv6_ext,
                expect: Expect::Pass,
            },
            Row {
                name: "IPv6 other address",
                frame: Frame::udp(CLIENT6, 1, "fd00:100::99", 53),
                expect: Expect::Pass,
            },
            Row {
                name: "BFD Control to the node",
                frame: bfd_to(CLIENT4, "198.18.100.99"),
                expect: Expect::Pass,
            },
            Row {
                name: "IPv6 BFD Control to the node",
                frame: bfd_to(CLIENT6, "fd00:100::99"),
                expect: Expect::Pass,
            },
        ],
    );
    // Frames the builder cannot express: ARP and a non-IP ether type.
    for (name, frame) in [("ARP", arp), ("LLDP", ethernet(None, 0x88cc, &[1u8; 40]))] {
        let (action, out) = s.lb.run(&frame);
        assert_eq!(action, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name} unchanged");
    }
}

#[test]
fn fragments_and_options() {
    let mut s = services();
    let affinity = s.affinity4.clone();
    let with_options = Frame {
        ip_options: vec![1, 1, 1, 0], // NOP NOP NOP EOL
        ..Frame::tcp(CLIENT4, 40000, "198.18.100.2", 80, TCP_SYN)
    };
    let first_fragment = Frame {
        frag: 0x2000, // MF
        ..Frame::tcp(CLIENT4, 40000, "198.18.100.2", 80, TCP_SYN)
    };
    let later_fragment = Frame {
        frag: 0x00b9,
        ..Frame::udp(CLIENT4, 40000, "198.18.100.2", 80)
    };
    run_table(
        &mut s,
        vec![
            Row {
                name: "IP options to a VIP",
                frame: with_options,
                expect: Expect::Drop(|st| st.drop_ip_options),
            },
            Row {
                name: "first fragment to a 5-tuple VIP",
                frame: first_fragment,
                expect: Expect::Drop(|st| st.drop_fragment),
            },
            Row {
                name: "IP options, not a VIP",
                frame: Frame {
                    ip_options: vec![1, 1, 1, 0],
                    ..Frame::tcp(CLIENT4, 40000, "198.18.100.99", 80, TCP_SYN)
                },
                expect: Expect::Pass,
            },
            Row {
                name: "fragment, not a VIP",
                frame: Frame {
                    frag: 0x2000,
                    ..Frame::udp(CLIENT4, 40000, "198.18.100.99", 80)
                },
                expect: Expect::Pass,
            },
        ],
    );
    // Later fragments to a TCP VIP address go unmatched as UDP: the UDP one is not a VIP there.
    let (action, _) = s.lb.run(&later_fragment.build());
    assert_eq!(action, XDP_PASS);

    // Source-IP affinity VIP: every fragment of a datagram (first, middle, last) goes to the
    // same backend as the unfragmented packets of that client.
    let whole = Frame::udp(CLIENT4, 40000, "198.18.100.4", 9999);
    let mut outer_dsts = Vec::new();
    for frag in [0x0000u16, 0x2000, 0x20b9, 0x0172] {
        let f = Frame {
            frag,
            ..whole.clone()
        };
        let (action, out) = s.lb.run(&f.build());
        assert_eq!(action, XDP_TX, "affinity fragment {frag:#x}");
        check_encapsulated(&s.lb, &affinity, &f, &out, "affinity fragment");
        outer_dsts.push(decode_encapsulated(&out).outer_dst);
    }
    assert!(
        outer_dsts.windows(2).all(|w| w[0] == w[1]),
        "{outer_dsts:?}"
    );
}

#[test]
fn icmp_too_big_goes_to_the_flows_backend() {
    let mut s = services();
    for (vip, spec, client, cport, vport) in [
        ("198.18.100.1", s.web4.clone(), CLIENT4, 40123u16, 80u16),
        ("fd00:100::1", s.web6.clone(), CLIENT6, 40123, 443),
    ] {
        let router = if vip.contains(':') {
            "fd00:99::1"
        } else {
            "198.18.99.1"
        };
        let frame = too_big(router, vip, vport, client, cport, IPPROTO_TCP);
        let before = s.lb.dataplane.stats().unwrap();
        let (action, out) = s.lb.run(&frame);
        assert_eq!(action, XDP_TX, "{vip}: ICMP too big is forwarded");
        let e = decode_encapsulated(&out);
        let client_flow = flow_key(
            client.parse().unwrap(),
            cport,
            vip.parse().unwrap(),
            vport,
            IPPROTO_TCP,
        );
        let (backend, _) = s.lb.predict(&spec, &client_flow);
        assert_eq!(
            e.outer_dst,
            s.lb.backend_addr(backend),
            "{vip}: the flow's backend"
        );
        assert_eq!(e.inner, frame[14..].to_vec(), "{vip}: ICMP packet intact");
        let after = s.lb.dataplane.stats().unwrap();
        assert_eq!(after.icmp_too_big, before.icmp_too_big + 1);
        // The SYN of that flow goes to the same backend.
        let syn = Frame::tcp(client, cport, vip, vport, TCP_SYN);
        let (_, out) = s.lb.run(&syn.build());
        assert_eq!(decode_encapsulated(&out).outer_dst, e.outer_dst);
    }
    // A too-big about a flow of no VIP passes.
    let frame = too_big("198.18.99.1", "198.18.100.99", 80, CLIENT4, 1, IPPROTO_TCP);
    assert_eq!(s.lb.run(&frame).0, XDP_PASS);
}

#[test]
fn source_prefix_spreads_outer_sources() {
    let mut s = services();
    let spec = s.prefixed4.clone();
    let mut sources = std::collections::HashSet::new();
    for port in 0..200u16 {
        let f = Frame::tcp(CLIENT4, 20000 + port, "198.18.100.5", 80, TCP_SYN);
        let (action, out) = s.lb.run(&f.build());
        assert_eq!(action, XDP_TX);
        check_encapsulated(&s.lb, &spec, &f, &out, "prefixed");
        let IpAddr::V4(src) = decode_encapsulated(&out).outer_src else {
            panic!("IPv4 outer source expected");
        };
        assert_eq!(
            u32::from(src) >> 12,
            u32::from_be_bytes([198, 19, 128, 0]) >> 12
        );
        sources.insert(src);
    }
    // 200 flows over 4096 host addresses: nearly all distinct (a constant source would give 1).
    assert!(
        sources.len() > 180,
        "only {} distinct outer sources",
        sources.len()
    );
}

#[test]
fn vip_without_backends_drops_and_counts() {
    let mut s = services();
    run_table(
        &mut s,
        vec![Row {
            name: "no backend",
            frame: Frame::tcp(CLIENT4, 40000, "198.18.100.6", 80, TCP_SYN),
            expect: Expect::Drop(|st| st.drop_no_backend),
        }],
    );
}

#[test]
fn counters_per_vip_and_backend() {
    let mut s = services();
    let vip_id = 0; // web4 was published first
    let frames: Vec<Frame> = (0..50)
        .map(|i| Frame::tcp(CLIENT4, 30000 + i, "198.18.100.1", 80, TCP_SYN))
        .collect();
    let mut per_backend = [0u64; 3];
    let mut bytes = 0u64;
    for f in &frames {
        let (backend, _) = s.lb.predict(&s.web4, &f.flow());
        per_backend[backend as usize] += 1;
        bytes += f.ip_packet().len() as u64;
        assert_eq!(s.lb.run(&f.build()).0, XDP_TX);
    }
    let vip = s.lb.dataplane.traffic_by_vip().unwrap()[&vip_id];
    assert_eq!((vip.packets, vip.bytes), (50, bytes));
    for (id, want) in per_backend.iter().enumerate() {
        let got = s.lb.dataplane.backend_traffic(id as u32).unwrap().packets;
        assert_eq!(got, *want, "backend {id} packets");
    }
    let stats = s.lb.dataplane.stats().unwrap();
    assert_eq!(stats.conntrack_miss, 50);
}

#[test]
fn redirect_when_the_next_hop_is_another_interface() {
    let mut lb = Lb::new();
    lb.backend_via(0, "198.18.1.1", Some(TEST_RUN_IFINDEX + 1000));
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0]));
    let f = Frame::tcp(CLIENT4, 40000, "198.18.100.1", 80, TCP_SYN);
    let (action, out) = lb.run(&f.build());
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(decode_encapsulated(&out).inner, f.ip_packet());
    assert_eq!(lb.dataplane.stats().unwrap().redirected, 1);
}

#[test]
fn vip_address_filter_follows_vip_changes() {
    let mut lb = Lb::new();
    lb.backend(0, "198.18.1.1");
    let web = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0]);
    let dns = VipSpec::new("198.18.100.1", IPPROTO_UDP, 53, &[0]);
    lb.vip(&web);
    lb.vip(&dns);
    let to_web = Frame::tcp(CLIENT4, 1000, "198.18.100.1", 80, TCP_SYN).build();
    let to_dns = Frame::udp(CLIENT4, 1000, "198.18.100.1", 53).build();
    assert_eq!(lb.run(&to_web).0, XDP_TX);

    // Removing one VIP of the address keeps the bit for the other.
    lb.remove_vip(&web.key());
    assert_eq!(lb.run(&to_web).0, XDP_PASS);
    assert_eq!(lb.run(&to_dns).0, XDP_TX);

    // Removing the last one clears it; adding a VIP back sets it.
    lb.remove_vip(&dns.key());
    assert_eq!(lb.run(&to_dns).0, XDP_PASS);
    let passed_before = lb.dataplane.stats().unwrap().passed;
    lb.vip(&web);
    assert_eq!(lb.run(&to_web).0, XDP_TX);
    assert_eq!(lb.dataplane.stats().unwrap().passed, passed_before);
}

#[test]
fn gue_encapsulation() {
    const PORT: u16 = 6080;
    let mut lb = Lb::new();
    lb.backend(0, "198.18.1.1").backend(1, "fd00:1::1");
    let gue = |addr: &str, proto: u8, port: u16, backend: u32| {
        let mut spec = VipSpec::new(addr, proto, port, &[backend]);
        spec.gue_port = Some(PORT);
        spec
    };
    let specs = [
        gue("198.18.100.1", IPPROTO_TCP, 80, 0),
        gue("198.18.100.1", IPPROTO_UDP, 53, 0),
        gue("fd00:100::1", IPPROTO_TCP, 443, 1),
        gue("fd00:100::1", IPPROTO_UDP, 53, 1),
        gue("198.18.100.3", IPPROTO_TCP, 80, 1),
        gue("198.18.100.3", IPPROTO_UDP, 53, 1),
    ];
    for spec in &specs {
        lb.vip(spec);
    }
    let no_checksum = |f: Frame| Frame {
        no_udp_checksum: true,
        ..f
    };
    // (frame, its VIP, expected outer protocol): GUE unless the IPv6 UDP checksum cannot be
    // derived from headers (IPv4 UDP without checksum), which goes 4in6.
    let rows = [
        (
            Frame::tcp(CLIENT4, 1000, "198.18.100.1", 80, TCP_SYN).with_tos(0x28),
            &specs[0],
            17,
        ),
        (Frame::udp(CLIENT4, 1000, "198.18.100.1", 53), &specs[1], 17),
        (
            no_checksum(Frame::udp(CLIENT4, 1001, "198.18.100.1", 53)),
            &specs[1],
            17,
        ),
        (
            Frame::tcp(CLIENT6, 1000, "fd00:100::1", 443, TCP_ACK),
            &specs[2],
            17,
        ),
        (
            Frame {
                payload: vec![7; 999],
                ..Frame::udp(CLIENT6, 1000, "fd00:100::1", 53)
            },
            &specs[3],
            17,
        ),
        (
            Frame::tcp(CLIENT4, 1000, "198.18.100.3", 80, TCP_SYN),
            &specs[4],
            17,
        ),
        (Frame::udp(CLIENT4, 1000, "198.18.100.3", 53), &specs[5], 17),
        (
            no_checksum(Frame::udp(CLIENT4, 1002, "198.18.100.3", 53)),
            &specs[5],
            IPPROTO_IPIP,
        ),
    ];
    for (i, (frame, spec, outer_proto)) in rows.iter().enumerate() {
        let (action, out) = lb.run(&frame.build());
        assert_eq!(action, XDP_TX, "row {i}");
        // decode_encapsulated checks the UDP length, the zero IPv4 checksum, and that the
        // IPv6 checksum verifies over the whole datagram.
        let e = decode_encapsulated(&out);
        let (backend, hash) = lb.predict(spec, &frame.flow());
        assert_eq!(e.outer_dst, lb.backend_addr(backend), "row {i}");
        assert_eq!(e.outer_proto, *outer_proto, "row {i}");
        assert_eq!(
            e.inner,
            frame.ip_packet(),
            "row {i}: inner packet byte for byte"
        );
        assert_eq!(e.outer_tos, frame.tos, "row {i}");
        if *outer_proto == 17 {
            let (sport, dport, _) = e.udp.expect("GUE");
            assert_eq!(dport, PORT, "row {i}");
            assert_eq!(
                sport,
                0xc000 | (hash as u16 & 0x3fff),
                "row {i}: source port from the flow hash"
            );
        } else {
            assert!(e.udp.is_none());
        }
    }
}

/// Replies to backends' egress connections: the destination port's block decides, on every LB
/// node alike; ICMP echo replies by their identifier, ICMP errors by the flow they quote.
#[test]
fn egress_ports_go_to_the_owner_of_their_block() {
    let mut s = services();
    let (web4, web6) = (s.web4.clone(), s.web6.clone());
    // 40000-40399 in blocks of 100: block 0 is backend 1's, block 1 backend 2's, block 2 is
    // free (or resting), block 3 backend 0's; IPv6: block 1 is backend 4's.
    s.lb.egress(&web4, (40_000, 40_399, 100), &[(0, 1), (1, 2), (3, 0)]);
    s.lb.egress(&web6, (40_000, 40_399, 100), &[(1, 4)]);
    let server4 = "203.0.113.7";
    let server6 = "fd00:203::7";
    let cases: Vec<(&str, Vec<u8>, BackendId)> = vec![
        (
            "TCP SYN-ACK to block 0",
            Frame::tcp(server4, 443, "198.18.100.1", 40_005, TCP_SYN | TCP_ACK).build(),
            1,
        ),
        (
            "TCP ACK to block 1",
            Frame::tcp(server4, 443, "198.18.100.1", 40_199, TCP_ACK).build(),
            2,
        ),
        (
            "UDP to block 3",
            Frame::udp(server4, 53, "198.18.100.1", 40_300).build(),
            0,
        ),
        (
            "echo reply, identifier in block 1",
            echo_reply(server4, "198.18.100.1", 40_150),
            2,
        ),
        (
            "port unreachable about a UDP flow of block 0",
            icmp_error(
                [3, 3],
                server4,
                ("198.18.100.1", 40_010),
                (server4, 53),
                IPPROTO_UDP,
            ),
            1,
        ),
        (
            "time exceeded about a TCP flow of block 3",
            icmp_error(
                [11, 0],
                "198.18.99.1",
                ("198.18.100.1", 40_350),
                (server4, 443),
                IPPROTO_TCP,
            ),
            0,
        ),
        (
            "too big about a TCP flow of block 1",
            too_big(
                "198.18.99.1",
                "198.18.100.1",
                40_100,
                server4,
                443,
                IPPROTO_TCP,
            ),
            2,
        ),
        (
            "IPv6 TCP to block 1",
            Frame::tcp(server6, 443, "fd00:100::1", 40_100, TCP_ACK).build(),
            4,
        ),
        (
            "IPv6 echo reply in block 1",
            echo_reply(server6, "fd00:100::1", 40_101),
            4,
        ),
        (
            "IPv6 unreachable about a UDP flow of block 1",
            icmp_error(
                [1, 4],
                "fd00:99::1",
                ("fd00:100::1", 40_111),
                (server6, 53),
                IPPROTO_UDP,
            ),
            4,
        ),
    ];
    for (name, frame, owner) in cases {
        let (action, out) = s.lb.run(&frame);
        assert_eq!(action, XDP_TX, "{name}: forwarded");
        let e = decode_encapsulated(&out);
        assert_eq!(
            e.outer_dst,
            s.lb.backend_addr(owner),
            "{name}: the block's owner"
        );
        assert_eq!(e.inner, frame[14..].to_vec(), "{name}: packet intact");
    }

    // Outside the range, not egress traffic, or a block without an owner: never misrouted.
    let before = s.lb.dataplane.stats().unwrap();
    let refused: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "a port above the range",
            Frame::tcp(server4, 443, "198.18.100.1", 40_400, TCP_ACK).build(),
            XDP_PASS,
        ),
        (
            "a port below the range",
            Frame::udp(server4, 53, "198.18.100.1", 39_999).build(),
            XDP_PASS,
        ),
        (
            "an echo reply outside the range",
            echo_reply(server4, "198.18.100.1", 7),
            XDP_PASS,
        ),
        (
            "port unreachable about an ingress flow",
            icmp_error(
                [3, 3],
                server4,
                ("198.18.100.1", 80),
                (CLIENT4, 40_000),
                IPPROTO_TCP,
            ),
            XDP_PASS,
        ),
        (
            "the free block 2",
            Frame::tcp(server4, 443, "198.18.100.1", 40_250, TCP_ACK).build(),
            XDP_DROP,
        ),
    ];
    for (name, frame, action) in refused {
        assert_eq!(s.lb.run(&frame).0, action, "{name}");
    }
    let after = s.lb.dataplane.stats().unwrap();
    assert_eq!(after.drop_no_backend, before.drop_no_backend + 1);

    // Ingress on the same address goes on as before: Maglev and conntrack.
    let syn = Frame::tcp(CLIENT4, 40_005, "198.18.100.1", 80, TCP_SYN);
    let (action, out) = s.lb.run(&syn.build());
    assert_eq!(action, XDP_TX);
    check_encapsulated(&s.lb, &web4, &syn, &out, "ingress beside egress");
}
