//! Malformed input never goes anywhere but a configured backend, and never breaks the run.
//!
//! Every frame below is run through the real program. Allowed outcomes: XDP_PASS with the frame
//! unchanged, XDP_DROP, or XDP_TX of a well-formed encapsulation (checksum verifies, lengths
//! consistent) toward a configured backend whose inner packet is the input's own bytes.

use std::net::IpAddr;

use rand::{Rng, SeedableRng, rngs::StdRng};
use vip_agent::config::HashFields;
use vip_common::{IPPROTO_TCP, IPPROTO_UDP};
use vip_tests::{fixture::*, packet::*};

fn configured() -> Lb {
    let mut lb = Lb::new();
    lb.backend(0, "198.18.1.1")
        .backend(1, "198.18.1.2")
        .backend(2, "fd00:1::1")
        .backend(3, "fd00:1::2");
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1]));
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_UDP, 53, &[0, 1]));
    lb.vip(&VipSpec::new("198.18.100.2", IPPROTO_TCP, 0, &[2, 3]));
    lb.vip(&VipSpec::new("fd00:100::1", IPPROTO_TCP, 443, &[2, 3]));
    lb.vip(&VipSpec::new("fd00:100::1", IPPROTO_UDP, 53, &[0, 1]));
    let mut affinity = VipSpec::new("198.18.100.4", IPPROTO_UDP, 0, &[0, 1]);
    affinity.hash = HashFields::Addresses;
    lb.vip(&affinity);
    lb
}

fn valid_frames() -> Vec<Vec<u8>> {
    vec![
        Frame::tcp("198.18.50.1", 1000, "198.18.100.1", 80, TCP_SYN).build(),
        Frame::udp("198.18.50.1", 1000, "198.18.100.1", 53).build(),
        Frame::tcp("198.18.50.1", 1000, "198.18.100.2", 7, TCP_ACK)
            .with_vlan(7)
            .build(),
        Frame::udp("198.18.50.1", 1000, "198.18.100.4", 1).build(),
        Frame::tcp("fd00:50::1", 1000, "fd00:100::1", 443, TCP_SYN).build(),
        Frame::udp("fd00:50::1", 1000, "fd00:100::1", 53)
            .with_vlan(9)
            .build(),
        too_big(
            "198.18.99.1",
            "198.18.100.1",
            80,
            "198.18.50.1",
            1000,
            IPPROTO_TCP,
        ),
        too_big(
            "fd00:99::1",
            "fd00:100::1",
            443,
            "fd00:50::1",
            1000,
            IPPROTO_TCP,
        ),
    ]
}

/// Runs `frame` and checks the invariant; returns the action.
fn check(lb: &mut Lb, frame: &[u8], what: &str) -> u32 {
    let (action, out) = lb.run(frame);
    let backends: Vec<IpAddr> = lb.backends.iter().map(|(_, a)| *a).collect();
    match action {
        XDP_PASS => assert_eq!(out, frame, "{what}: passed frames are unchanged"),
        XDP_DROP => {}
        XDP_TX => {
            let e = decode_encapsulated(&out);
            assert!(
                backends.contains(&e.outer_dst),
                "{what}: sent to {} which is no backend",
                e.outer_dst
            );
            let l3 = if frame[12..14] == [0x81, 0x00] {
                18
            } else {
                14
            };
            assert!(
                frame[l3..].starts_with(&e.inner),
                "{what}: inner packet must be the input's bytes"
            );
        }
        other => panic!("{what}: unexpected action {other} for {frame:02x?}"),
    }
    action
}

#[test]
fn truncated_at_every_length() {
    let mut lb = configured();
    let mut cases = 0;
    for frame in valid_frames() {
        // The kernel never hands XDP less than an Ethernet header.
        for len in 14..=frame.len() {
            let action = check(&mut lb, &frame[..len], &format!("truncated to {len}"));
            cases += 1;
            if len < frame.len() {
                assert_ne!(
                    action, XDP_TX,
                    "a truncated frame of {len} bytes was forwarded"
                );
            }
        }
    }
    assert!(cases > 400, "only {cases} cases");
}

#[test]
fn bad_header_fields() {
    let mut lb = configured();
    let v4 = Frame::tcp("198.18.50.1", 1000, "198.18.100.1", 80, TCP_SYN).build();
    let v6 = Frame::tcp("fd00:50::1", 1000, "fd00:100::1", 443, TCP_SYN).build();
    for vihl in 0..=255u8 {
        let mut f = v4.clone();
        f[14] = vihl;
        let action = check(&mut lb, &f, &format!("version/IHL {vihl:#x}"));
        if vihl != 0x45 {
            assert_ne!(action, XDP_TX, "version/IHL {vihl:#x} forwarded");
        }
    }
    for tot_len in (0..=u16::MAX)
        .step_by(7)
        .chain([0, 19, 20, 39, 40, 42, 43, 44, 1500])
    {
        let mut f = v4.clone();
        f[16..18].copy_from_slice(&tot_len.to_be_bytes());
        let action = check(&mut lb, &f, &format!("IPv4 total length {tot_len}"));
        if usize::from(tot_len) > f.len() - 14 || tot_len < 40 {
            assert_ne!(action, XDP_TX, "lying total length {tot_len} forwarded");
        }
    }
    for payload_len in (0..=u16::MAX).step_by(7).chain([0, 19, 20, 23, 24, 1500]) {
        let mut f = v6.clone();
        f[18..20].copy_from_slice(&payload_len.to_be_bytes());
        let action = check(&mut lb, &f, &format!("IPv6 payload length {payload_len}"));
        if usize::from(payload_len) > f.len() - 54 || payload_len < 20 {
            assert_ne!(
                action, XDP_TX,
                "lying payload length {payload_len} forwarded"
            );
        }
    }
    for version in 0..16u8 {
        let mut f = v6.clone();
        f[14] = (version << 4) | (f[14] & 0x0f);
        let action = check(&mut lb, &f, &format!("IPv6 version {version}"));
        if version != 6 {
            assert_ne!(action, XDP_TX);
        }
    }
}

#[test]
fn random_bytes_and_mutations() {
    let seed = rand::rng().random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lb = configured();
    let valid = valid_frames();
    let mut tx = 0;
    for i in 0..10_000 {
        // Pure noise, sometimes behind a plausible Ethernet/IP prefix.
        let len = rng.random_range(14..200);
        let mut f: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 {
            let template = &valid[i % valid.len()];
            let keep = rng.random_range(12..template.len().min(len));
            f[..keep].copy_from_slice(&template[..keep]);
        }
        check(&mut lb, &f, &format!("random frame {i} (seed {seed})"));
    }
    for i in 0..10_000 {
        let mut f = valid[i % valid.len()].clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..f.len());
            f[at] = rng.random();
        }
        if rng.random_bool(0.2) {
            let cut = rng.random_range(14..=f.len());
            f.truncate(cut);
        }
        if check(&mut lb, &f, &format!("mutated frame {i} (seed {seed})")) == XDP_TX {
            tx += 1;
        }
    }
    // Most single-byte mutations leave a forwardable packet: the check above really ran on TX.
    assert!(tx > 1000, "only {tx} mutated frames were forwarded");
}
