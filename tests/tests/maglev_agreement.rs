//! The datapath picks exactly the backend userspace Maglev predicts, and two independently
//! loaded copies (as on two LB nodes) pick the same backend for every flow.

use std::{collections::HashMap, net::IpAddr};

use rand::{Rng, SeedableRng, rngs::StdRng};
use vip_common::{IPPROTO_TCP, IPPROTO_UDP, layout::DEFAULT_TABLE_SIZE};
use vip_tests::{fixture::*, packet::*};

const BACKENDS: [(&str, u32); 6] = [
    ("198.18.1.1", 1),
    ("198.18.1.2", 1),
    ("198.18.1.3", 2),
    ("198.18.1.4", 1),
    ("fd00:1::1", 3),
    ("fd00:1::2", 1),
];

/// An LB node: backends registered in `order`, with ids assigned in that order.
fn node(order: &[usize]) -> (Lb, Vec<VipSpec>) {
    let mut lb = Lb::with_table_size(DEFAULT_TABLE_SIZE);
    let mut members = Vec::new();
    for (id, &i) in order.iter().enumerate() {
        let (addr, weight) = BACKENDS[i];
        lb.backend(id as u32 + 10, addr);
        members.push((id as u32 + 10, weight));
    }
    let mut specs = Vec::new();
    for (vip, proto, port) in [
        ("198.18.100.1", IPPROTO_TCP, 80),
        ("198.18.100.1", IPPROTO_UDP, 53),
        ("fd00:100::1", IPPROTO_TCP, 443),
    ] {
        let mut spec = VipSpec::new(vip, proto, port, &[]);
        spec.backends = members.clone();
        lb.vip(&spec);
        specs.push(spec);
    }
    (lb, specs)
}

fn random_flow(rng: &mut StdRng, spec: &VipSpec) -> Frame {
    let client: IpAddr = match spec.addr {
        IpAddr::V4(_) => IpAddr::from([198, 18, rng.random(), rng.random()]),
        IpAddr::V6(_) => {
            let mut a = [0u8; 16];
            a[0] = 0xfd;
            rng.fill(&mut a[1..]);
            IpAddr::from(a)
        }
    };
    let mut f = Frame::tcp(
        &client.to_string(),
        rng.random_range(1024..=65535),
        &spec.addr.to_string(),
        spec.port,
        TCP_SYN,
    );
    if spec.proto == IPPROTO_UDP {
        f = Frame::udp(
            &client.to_string(),
            f.sport,
            &spec.addr.to_string(),
            spec.port,
        );
    }
    f
}

#[test]
fn ten_thousand_flows_follow_userspace_maglev() {
    let seed = rand::rng().random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut lb, specs) = node(&[0, 1, 2, 3, 4, 5]);
    let mut per_backend: HashMap<IpAddr, usize> = HashMap::new();
    for i in 0..10_000 {
        let spec = &specs[i % specs.len()];
        let f = random_flow(&mut rng, spec);
        let (action, out) = lb.run(&f.build());
        assert_eq!(action, XDP_TX, "flow {i}");
        let got = decode_encapsulated(&out).outer_dst;
        let (want, _) = lb.predict(spec, &f.flow());
        assert_eq!(got, lb.backend_addr(want), "flow {i} {f:?} (seed {seed})");
        *per_backend.entry(got).or_default() += 1;
    }
    // Shares follow weights (total weight 9): each within 25% of its expected count. With
    // ~1,100 flows per unit of weight the binomial spread is about 3%, so this cannot flake.
    for (addr, weight) in BACKENDS {
        let got = per_backend[&addr.parse::<IpAddr>().unwrap()] as f64;
        let want = 10_000.0 * f64::from(weight) / 9.0;
        assert!(
            (got - want).abs() < want * 0.25,
            "{addr}: {got} flows, expected {want}"
        );
    }
}

#[test]
fn two_independently_loaded_copies_agree() {
    let seed = rand::rng().random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    // Same config, listed in a different order, so the two copies have different backend ids.
    let (mut a, specs_a) = node(&[0, 1, 2, 3, 4, 5]);
    let (mut b, _) = node(&[5, 3, 1, 4, 2, 0]);
    for i in 0..10_000 {
        let spec = &specs_a[i % specs_a.len()];
        let frame = random_flow(&mut rng, spec).build();
        let (action_a, out_a) = a.run(&frame);
        let (action_b, out_b) = b.run(&frame);
        assert_eq!((action_a, action_b), (XDP_TX, XDP_TX));
        assert_eq!(
            decode_encapsulated(&out_a).outer_dst,
            decode_encapsulated(&out_b).outer_dst,
            "flow {i}: the two LB nodes disagree (seed {seed})"
        );
    }
}
