//! Building test frames and decoding encapsulated output.

use std::net::{IpAddr, SocketAddr};

use vip_common::{FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, checksum};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// A frame to build: Ethernet (optional VLAN tag), IPv4 or IPv6, TCP or UDP, payload.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub tos: u8,
    pub vlan: Option<u16>,
    pub payload: Vec<u8>,
    /// IPv4 options (multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv4 flags + fragment offset field.
    pub frag: u16,
    /// Leave the UDP checksum zero ("no checksum", allowed over IPv4).
    pub no_udp_checksum: bool,
}

impl Frame {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self {
            src: src.parse().expect("address"),
            dst: dst.parse().expect("address"),
            proto: IPPROTO_TCP,
            sport,
            dport,
            tcp_flags: flags,
            tos: 0,
            vlan: None,
            payload: b"vip".to_vec(),
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            no_udp_checksum: false,
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self {
            proto: IPPROTO_UDP,
            tcp_flags: 0,
            ..Self::tcp(src, sport, dst, dport, 0)
        }
    }

    pub fn with_vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    pub fn with_tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    /// The flow as the LB keys it.
    pub fn flow(&self) -> FlowKey {
        flow_key(self.src, self.sport, self.dst, self.dport, self.proto)
    }

    /// The transport header and payload, with a correct checksum (over the pseudo-header).
    fn l4(&self) -> Vec<u8> {
        let mut l4 = self.l4_unchecked();
        if self.proto == IPPROTO_UDP && self.no_udp_checksum {
            return l4;
        }
        let at = if self.proto == IPPROTO_TCP { 16 } else { 6 };
        let mut pseudo = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&[0, self.proto]);
                pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, self.proto]);
            }
            _ => panic!("mixed address families"),
        }
        pseudo.extend_from_slice(&l4);
        let sum = match !checksum::fold_sum(&pseudo) {
            0 if self.proto == IPPROTO_UDP => 0xffff,
            c => c,
        };
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        l4
    }

    fn l4_unchecked(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == IPPROTO_TCP {
            l4.extend_from_slice(&1u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(0x50); // data offset 5
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        l4
    }

    /// The IP packet (what the backend must receive byte for byte).
    pub fn ip_packet(&self) -> Vec<u8> {
        ip_packet(
            self.src,
            self.dst,
            self.proto,
            self.tos,
            &self.ip_options,
            self.frag,
            &self.l4(),
        )
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let ether_type = if self.src.is_ipv4() {
            0x0800u16
        } else {
            0x86dd
        };
        ethernet(self.vlan, ether_type, &self.ip_packet())
    }
}

/// A conntrack key / hash input.
pub fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    FlowKey::between(
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
        proto,
    )
}

/// An Ethernet frame from the client to the LB around `payload`.
pub fn ethernet(vlan: Option<u16>, ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    if let Some(id) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 or IPv6 packet around `l4`.
pub fn ip_packet(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    tos: u8,
    options: &[u8],
    frag: u16,
    l4: &[u8],
) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let hlen = 20 + options.len();
            p.push(0x40 | (hlen / 4) as u8);
            p.push(tos);
            p.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
            p.extend_from_slice(&[0x12, 0x34]);
            p.extend_from_slice(&frag.to_be_bytes());
            p.push(61);
            p.push(proto);
            p.extend_from_slice(&[0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(options);
            let sum = !checksum::fold_sum(&p);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.push(0x60 | (tos >> 4));
            p.push((tos << 4) | 0x0a);
            p.extend_from_slice(&[0xbc, 0xde]); // a flow label the LB must keep
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.push(proto);
            p.push(61);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed address families"),
    }
    p.extend_from_slice(l4);
    p
}

/// An ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) from `router` to `vip`,
/// quoting a packet the backend sent from `vip:vport` to `client:cport`.
pub fn too_big(
    router: &str,
    vip: &str,
    vport: u16,
    client: &str,
    cport: u16,
    proto: u8,
) -> Vec<u8> {
    let kind = if vip.contains(':') { [2, 0] } else { [3, 4] };
    icmp_error(kind, router, (vip, vport), (client, cport), proto)
}

/// An ICMP error of `[type, code]` from `router` to `vip`, quoting a packet of `proto` that a
/// backend sent from `vip:vport` to `peer:pport`.
pub fn icmp_error(
    [icmp_type, code]: [u8; 2],
    router: &str,
    (vip, vport): (&str, u16),
    (peer, pport): (&str, u16),
    proto: u8,
) -> Vec<u8> {
    let router: IpAddr = router.parse().expect("address");
    let vip: IpAddr = vip.parse().expect("address");
    let peer: IpAddr = peer.parse().expect("address");
    let mut quoted_l4 = Vec::new();
    quoted_l4.extend_from_slice(&vport.to_be_bytes());
    quoted_l4.extend_from_slice(&pport.to_be_bytes());
    quoted_l4.extend_from_slice(&[0; 4]);
    let quoted = ip_packet(vip, peer, proto, 0, &[], 0x4000, &quoted_l4);
    // MTU 1500 in the "unused" word (read only by "too big").
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(&quoted);
    icmp_frame(router, vip, &icmp)
}

/// An ICMP echo reply (ICMPv6 for IPv6 addresses) from `from` to `to` with identifier `id`.
pub fn echo_reply(from: &str, to: &str, id: u16) -> Vec<u8> {
    let from: IpAddr = from.parse().expect("address");
    let to: IpAddr = to.parse().expect("address");
    let icmp_type = if to.is_ipv4() { 0 } else { 129 };
    let mut icmp = vec![icmp_type, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&[0, 1]); // sequence
    icmp.extend_from_slice(b"ping payload");
    icmp_frame(from, to, &icmp)
}

fn icmp_frame(from: IpAddr, to: IpAddr, icmp: &[u8]) -> Vec<u8> {
    let (proto, ether_type) = if to.is_ipv4() {
        (IPPROTO_ICMP, 0x0800)
    } else {
        (IPPROTO_ICMPV6, 0x86dd)
    };
    ethernet(
        None,
        ether_type,
        &ip_packet(from, to, proto, 0, &[], 0, icmp),
    )
}

/// An encapsulated frame, decoded.
#[derive(Debug)]
pub struct Encapsulated {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    /// 4 (IPIP) or 41 (IPv6 inside).
    pub outer_proto: u8,
    pub outer_tos: u8,
    pub outer_ttl: u8,
    pub flow_label: Option<u32>,
    /// GUE: (source port, destination port, UDP checksum field).
    pub udp: Option<(u16, u16, u16)>,
    pub inner: Vec<u8>,
}

/// Splits a GUE UDP header off an outer payload: (ports and checksum, inner packet); checks
/// the UDP length.
fn gue(payload: &[u8]) -> ((u16, u16, u16), Vec<u8>) {
    let word = |i: usize| u16::from_be_bytes([payload[i], payload[i + 1]]);
    assert_eq!(usize::from(word(4)), payload.len(), "UDP length");
    ((word(0), word(2), word(6)), payload[8..].to_vec())
}

/// Decodes an encapsulated frame, asserting every outer header invariant on the way: version,
/// header length, lengths that match the frame, DF/fragment fields clear, checksum verifying.
pub fn decode_encapsulated(frame: &[u8]) -> Encapsulated {
    let dst_mac: [u8; 6] = frame[0..6].try_into().unwrap();
    let src_mac: [u8; 6] = frame[6..12].try_into().unwrap();
    let (vlan, ether_type, l3) = if frame[12..14] == [0x81, 0x00] {
        (
            Some(u16::from_be_bytes([frame[14], frame[15]])),
            u16::from_be_bytes([frame[16], frame[17]]),
            18,
        )
    } else {
        (None, u16::from_be_bytes([frame[12], frame[13]]), 14)
    };
    let outer = &frame[l3..];
    match ether_type {
        0x0800 => {
            assert_eq!(outer[0], 0x45, "outer IPv4 header without options");
            let total = u16::from_be_bytes([outer[2], outer[3]]) as usize;
            assert_eq!(
                outer[4..8],
                [0, 0, 0, 0],
                "outer id/flags/fragment are zero"
            );
            assert_eq!(
                checksum::fold_sum(&outer[..20]),
                0xffff,
                "outer checksum must verify"
            );
            let (udp, inner) = if outer[9] == 17 {
                let (udp, inner) = gue(&outer[20..total]);
                assert_eq!(udp.2, 0, "GUE over IPv4 sends no UDP checksum");
                (Some(udp), inner)
            } else {
                (None, outer[20..total].to_vec())
            };
            Encapsulated {
                dst_mac,
                src_mac,
                vlan,
                outer_src: IpAddr::from(<[u8; 4]>::try_from(&outer[12..16]).unwrap()),
                outer_dst: IpAddr::from(<[u8; 4]>::try_from(&outer[16..20]).unwrap()),
                outer_proto: outer[9],
                outer_tos: outer[1],
                outer_ttl: outer[8],
                flow_label: None,
                udp,
                inner,
            }
        }
        0x86dd => {
            assert_eq!(outer[0] >> 4, 6, "outer IPv6 version");
            let payload = u16::from_be_bytes([outer[4], outer[5]]) as usize;
            let (udp, inner) = if outer[6] == 17 {
                // The UDP checksum must verify over pseudo-header and the whole datagram.
                let datagram = &outer[40..40 + payload];
                let mut pseudo = outer[8..40].to_vec();
                pseudo.extend_from_slice(&(payload as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 17]);
                pseudo.extend_from_slice(datagram);
                assert_eq!(
                    checksum::fold_sum(&pseudo),
                    0xffff,
                    "GUE UDP checksum must verify"
                );
                let (udp, inner) = gue(datagram);
                assert_ne!(udp.2, 0, "IPv6 UDP checksum must not be zero");
                (Some(udp), inner)
            } else {
                (None, outer[40..40 + payload].to_vec())
            };
            Encapsulated {
                dst_mac,
                src_mac,
                vlan,
                outer_src: IpAddr::from(<[u8; 16]>::try_from(&outer[8..24]).unwrap()),
                outer_dst: IpAddr::from(<[u8; 16]>::try_from(&outer[24..40]).unwrap()),
                outer_proto: outer[6],
                outer_tos: (outer[0] << 4) | (outer[1] >> 4),
                outer_ttl: outer[7],
                flow_label: Some(u32::from_be_bytes([0, outer[1] & 0x0f, outer[2], outer[3]])),
                udp,
                inner,
            }
        }
        other => panic!("output ether type {other:#06x} is not IP"),
    }
}
