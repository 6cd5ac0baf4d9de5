//! Packet fixture rows: frames and what the datapath must do with each, against a standard set
//! of services. The packet tests run tables of them; the benchmark times [`timed_rows`], checked
//! by the same tests.

use std::net::IpAddr;

use vip_agent::config::HashFields;
use vip_common::{DatapathStats, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{fixture::*, packet::*};

pub const CLIENT4: &str = "198.18.50.7";
pub const CLIENT6: &str = "fd00:50::7";

/// The VIPs every table runs against.
pub struct Services {
    pub lb: Lb,
    pub web4: VipSpec,
    pub dns4: VipSpec,
    pub all_ports4: VipSpec,
    pub web6: VipSpec,
    pub dns6: VipSpec,
    pub v4_over_v6: VipSpec,
    pub v6_over_v4: VipSpec,
    pub affinity4: VipSpec,
    pub prefixed4: VipSpec,
}

/// The standard services on a small table.
pub fn services() -> Services {
    services_on(Lb::new())
}

/// The standard services on `lb`.
pub fn services_on(mut lb: Lb) -> Services {
    lb.backend(0, "198.18.1.1")
        .backend(1, "198.18.1.2")
        .backend(2, "198.18.1.3")
        .backend(3, "fd00:1::1")
        .backend(4, "fd00:1::2");
    let web4 = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1, 2]);
    let dns4 = VipSpec::new("198.18.100.1", IPPROTO_UDP, 53, &[0, 1, 2]);
    let all_ports4 = VipSpec::new("198.18.100.2", IPPROTO_TCP, 0, &[0, 1]);
    let web6 = VipSpec::new("fd00:100::1", IPPROTO_TCP, 443, &[3, 4]);
    let dns6 = VipSpec::new("fd00:100::1", IPPROTO_UDP, 53, &[3, 4]);
    let v4_over_v6 = VipSpec::new("198.18.100.3", IPPROTO_TCP, 80, &[3, 4]);
    let v6_over_v4 = VipSpec::new("fd00:100::3", IPPROTO_TCP, 80, &[0, 1]);
    let mut affinity4 = VipSpec::new("198.18.100.4", IPPROTO_UDP, 0, &[0, 1, 2]);
    affinity4.hash = HashFields::Addresses;
    let mut prefixed4 = VipSpec::new("198.18.100.5", IPPROTO_TCP, 80, &[0, 1, 2]);
    prefixed4.source_prefix = Some("198.19.128.0/20".parse().unwrap());
    let empty4 = VipSpec::new("198.18.100.6", IPPROTO_TCP, 80, &[]);
    for spec in [
        &web4,
        &dns4,
        &all_ports4,
        &web6,
        &dns6,
        &v4_over_v6,
        &v6_over_v4,
        &affinity4,
        &prefixed4,
        &empty4,
    ] {
        lb.vip(spec);
    }
    Services {
        lb,
        web4,
        dns4,
        all_ports4,
        web6,
        dns6,
        v4_over_v6,
        v6_over_v4,
        affinity4,
        prefixed4,
    }
}

/// What a row expects.
pub enum Expect {
    /// Encapsulated toward the backend Maglev predicts for this VIP.
    Encap(VipSpec),
    /// Passed to the stack unchanged.
    Pass,
    /// Dropped, and this counter went up by one.
    Drop(fn(&DatapathStats) -> u64),
}

pub struct Row {
    pub name: &'static str,
    pub frame: Frame,
    pub expect: Expect,
}

impl Row {
    /// The XDP action the row expects.
    pub fn action(&self) -> u32 {
        match self.expect {
            Expect::Encap(_) => XDP_TX,
            Expect::Pass => XDP_PASS,
            Expect::Drop(_) => XDP_DROP,
        }
    }
}

/// Runs every row through `s` and checks what came out.
pub fn run_table(s: &mut Services, rows: Vec<Row>) {
    for row in rows {
        let input = row.frame.build();
        let before = s.lb.dataplane.stats().unwrap();
        let (action, out) = s.lb.run(&input);
        let after = s.lb.dataplane.stats().unwrap();
        match row.expect {
            Expect::Encap(spec) => {
                assert_eq!(action, XDP_TX, "{}: action", row.name);
                check_encapsulated(&s.lb, &spec, &row.frame, &out, row.name);
                assert_eq!(after.tx, before.tx + 1, "{}: tx counter", row.name);
            }
            Expect::Pass => {
                assert_eq!(action, XDP_PASS, "{}: action", row.name);
                assert_eq!(out, input, "{}: passed frame must be unchanged", row.name);
                assert_eq!(
                    after.passed,
                    before.passed + 1,
                    "{}: passed counter",
                    row.name
                );
            }
            Expect::Drop(counter) => {
                assert_eq!(action, XDP_DROP, "{}: action", row.name);
                assert_eq!(
                    counter(&after),
                    counter(&before) + 1,
                    "{}: drop counter",
                    row.name
                );
            }
        }
    }
}

/// Checks every field of an encapsulated frame against the configuration and the input.
pub fn check_encapsulated(lb: &Lb, spec: &VipSpec, frame: &Frame, out: &[u8], name: &str) {
    let e = decode_encapsulated(out);
    let (backend, hash) = lb.predict(spec, &frame.flow());
    let backend_addr = lb.backend_addr(backend);
    assert_eq!(
        e.outer_dst, backend_addr,
        "{name}: outer destination is the Maglev backend"
    );
    let expected_src: IpAddr = match (backend_addr, spec.source_prefix) {
        (IpAddr::V4(_), Some(ipnet::IpNet::V4(prefix))) => {
            let host = u32::MAX >> prefix.prefix_len();
            IpAddr::from(std::net::Ipv4Addr::from(
                u32::from(prefix.network()) | (hash & host),
            ))
        }
        (IpAddr::V4(_), _) => LB_SRC4.parse().unwrap(),
        (IpAddr::V6(_), _) => LB_SRC6.parse().unwrap(),
    };
    assert_eq!(e.outer_src, expected_src, "{name}: outer source");
    let expected_proto = if frame.src.is_ipv4() {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    assert_eq!(e.outer_proto, expected_proto, "{name}: outer protocol");
    assert_eq!(e.outer_ttl, 64, "{name}: outer TTL");
    assert_eq!(e.outer_tos, frame.tos, "{name}: TOS / traffic class copied");
    if backend_addr.is_ipv6() {
        assert_eq!(
            e.flow_label,
            Some(hash & 0xfffff),
            "{name}: flow label from the flow hash"
        );
    }
    assert_eq!(
        e.dst_mac, GATEWAY_MAC,
        "{name}: destination MAC is the next hop"
    );
    assert_eq!(
        e.src_mac, LB_MAC,
        "{name}: source MAC is the egress interface"
    );
    assert_eq!(e.vlan, frame.vlan, "{name}: VLAN tag kept");
    assert_eq!(
        e.inner,
        frame.ip_packet(),
        "{name}: inner packet byte for byte"
    );
}

/// The rows the benchmark times, one per datapath case: a SYN, an established flow (its
/// conntrack entry made by a first run), UDP, the same over IPv6, and a packet for no VIP.
pub fn timed_rows(s: &Services) -> Vec<Row> {
    vec![
        Row {
            name: "TCP SYN to a VIP",
            frame: Frame::tcp(CLIENT4, 40000, "198.18.100.1", 80, TCP_SYN),
            expect: Expect::Encap(s.web4.clone()),
        },
        Row {
            name: "established TCP",
            frame: Frame::tcp(CLIENT4, 40001, "198.18.100.1", 80, TCP_ACK),
            expect: Expect::Encap(s.web4.clone()),
        },
        Row {
            name: "UDP",
            frame: Frame::udp(CLIENT4, 40002, "198.18.100.1", 53),
            expect: Expect::Encap(s.dns4.clone()),
        },
        Row {
            name: "IPv6 TCP SYN",
            frame: Frame::tcp(CLIENT6, 40000, "fd00:100::1", 443, TCP_SYN),
            expect: Expect::Encap(s.web6.clone()),
        },
        Row {
            name: "IPv6 established TCP",
            frame: Frame::tcp(CLIENT6, 40001, "fd00:100::1", 443, TCP_ACK),
            expect: Expect::Encap(s.web6.clone()),
        },
        Row {
            name: "non-VIP packet",
            frame: Frame::tcp(CLIENT4, 40000, "198.18.200.1", 80, TCP_ACK),
            expect: Expect::Pass,
        },
    ]
}
