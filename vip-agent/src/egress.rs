//! VIPs as backends' source addresses (`[[egress]]`): which blocks rest, and what each backend
//! source-NATs into.
//!
//! The config gives every backend its block, so all nodes agree without talking. What the
//! config alone cannot say is history: a block whose backend left (or moved to another block)
//! rests for the section's `rest` before its new owner gets it, on load balancers (the owner
//! table names nobody; late replies to the old owner's connections are dropped rather than
//! handed to a stranger) and on the new owner (it translates into the block only afterwards).
//! Every node that saw the change counts the same rest from the moment it applied it.

use std::{collections::HashMap, net::IpAddr, time::Instant};

use vip_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{config::EgressConfig, net::nat::SourceNat};

/// Blocks that rest: by egress VIP and block, until when.
#[derive(Clone, Debug, Default)]
pub struct Blocks {
    resting: HashMap<(IpAddr, u16), Resting>,
}

/// A block that rests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resting {
    /// The backend that owned it.
    pub previous: IpAddr,
    pub until: Instant,
}

impl Blocks {
    /// Takes the change from `old` to `new` sections at `now`: every block whose owner left it
    /// starts resting; a block given back to the backend that left it rests no more.
    pub fn change(&mut self, old: &[EgressConfig], new: &[EgressConfig], now: Instant) {
        for before in old {
            let after = new.iter().find(|e| e.vip == before.vip);
            for owner in &before.backends {
                let still = after.and_then(|e| e.backends.iter().find(|b| b.block == owner.block));
                if still.is_some_and(|b| b.address == owner.address) {
                    continue;
                }
                let rest = after.map_or(before.rest, |e| e.rest);
                self.resting.insert(
                    (before.vip, owner.block),
                    Resting {
                        previous: owner.address,
                        until: now + rest,
                    },
                );
            }
        }
        self.resting.retain(|(vip, block), r| {
            let owner = new
                .iter()
                .find(|e| e.vip == *vip)
                .and_then(|e| e.backends.iter().find(|b| b.block == *block));
            owner.is_none_or(|b| b.address != r.previous)
        });
    }

    /// Whether block `block` of `vip` rests at `now`.
    pub fn resting(&self, vip: IpAddr, block: u16, now: Instant) -> Option<Resting> {
        self.resting
            .get(&(vip, block))
            .filter(|r| now < r.until)
            .copied()
    }

    /// Forgets rests that ended by `now`; true if any did (owners change).
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.resting.len();
        self.resting.retain(|_, r| now < r.until);
        self.resting.len() != before
    }
}

/// The source NAT a backend with addresses `own` sets up: for each egress VIP where one of
/// them owns a block that does not rest, TCP, UDP and ICMP echo from the VIP leave with a
/// source port (echo identifier) in that block.
pub fn source_nat(
    sections: &[EgressConfig],
    own: &[IpAddr],
    blocks: &Blocks,
    now: Instant,
) -> Vec<SourceNat> {
    let mut rules = Vec::new();
    for egress in sections {
        for b in egress.backends.iter().filter(|b| own.contains(&b.address)) {
            if blocks.resting(egress.vip, b.block, now).is_some() {
                continue;
            }
            let (first, last) = egress.block_ports(b.block);
            let icmp = if egress.vip.is_ipv4() {
                IPPROTO_ICMP
            } else {
                IPPROTO_ICMPV6
            };
            for protocol in [IPPROTO_TCP, IPPROTO_UDP, icmp] {
                rules.push(SourceNat {
                    source: egress.vip,
                    protocol,
                    first,
                    last,
                });
            }
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::EgressBackend;

    fn section(owners: &[(&str, u16)]) -> EgressConfig {
        EgressConfig {
            vip: "198.19.0.1".parse().unwrap(),
            first_port: 40_000,
            last_port: 40_999,
            block_size: 100,
            rest: Duration::from_secs(60),
            backends: owners
                .iter()
                .map(|(a, block)| EgressBackend {
                    address: a.parse().unwrap(),
                    block: *block,
                })
                .collect(),
        }
    }

    #[test]
    fn a_left_block_rests_before_its_new_owner_gets_it() {
        let vip: IpAddr = "198.19.0.1".parse().unwrap();
        let t0 = Instant::now();
        let mut blocks = Blocks::default();
        let old = [section(&[("10.0.0.1", 0), ("10.0.0.2", 1)])];
        // 10.0.0.2 leaves and 10.0.0.3 takes its block; 10.0.0.1 keeps block 0.
        let new = [section(&[("10.0.0.1", 0), ("10.0.0.3", 1)])];
        blocks.change(&old, &new, t0);
        assert!(blocks.resting(vip, 0, t0).is_none());
        assert!(blocks.resting(vip, 1, t0).is_some());
        let own = ["10.0.0.3".parse().unwrap()];
        assert!(source_nat(&new, &own, &blocks, t0).is_empty());
        let later = t0 + Duration::from_secs(61);
        assert!(blocks.resting(vip, 1, later).is_none());
        assert!(blocks.expire(later));
        let rules = source_nat(&new, &own, &blocks, later);
        assert_eq!(rules.len(), 3);
        assert!(rules.iter().all(|r| (r.first, r.last) == (40_100, 40_199)));
    }

    #[test]
    fn a_block_given_back_to_its_backend_rests_no_more() {
        let vip: IpAddr = "198.19.0.1".parse().unwrap();
        let t0 = Instant::now();
        let mut blocks = Blocks::default();
        let with = [section(&[("10.0.0.1", 0)])];
        let without = [section(&[])];
        blocks.change(&with, &without, t0);
        assert!(blocks.resting(vip, 0, t0).is_some());
        blocks.change(&without, &with, t0);
        assert!(blocks.resting(vip, 0, t0).is_none());
    }

    #[test]
    fn a_backend_moved_to_another_block_leaves_its_old_one_resting() {
        let vip: IpAddr = "198.19.0.1".parse().unwrap();
        let t0 = Instant::now();
        let mut blocks = Blocks::default();
        blocks.change(
            &[section(&[("10.0.0.1", 0)])],
            &[section(&[("10.0.0.1", 2)])],
            t0,
        );
        assert!(blocks.resting(vip, 0, t0).is_some());
        assert!(blocks.resting(vip, 2, t0).is_none());
    }
}
