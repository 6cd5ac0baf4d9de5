//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), with weights.
//!
//! The table depends only on the *set* of backends (their addresses and weights), never on the
//! order they were listed in or on the [`BackendId`]s the agent gave them: every LB node given the
//! same config builds the same table, which is what keeps a flow on its backend when ECMP moves
//! it to another LB node. Backends are sorted by address before filling, and each backend's
//! permutation comes from a fixed-seed hash of its address.
//!
//! Weights: in each round a backend claims `weight / gcd(weights)` slots, so shares follow weights
//! to within one round's worth of slots (at most the largest reduced weight) at the end of the fill.

use std::{net::IpAddr, vec, vec::Vec};

use crate::{
    hash::{backend_hash, maglev_slot},
    maps::{BackendId, NO_BACKEND, addr_bytes},
};

const OFFSET_SALT: u64 = 0x6f66_6673_6574; // "offset"
const SKIP_SALT: u64 = 0x736b_6970; // "skip"

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Identity in the table's permutation: the backend's address.
    pub addr: IpAddr,
    /// Relative weight; 0 means "not in the table" (draining or down).
    pub weight: u32,
    /// What the table's slots hold for this backend.
    pub id: BackendId,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("Maglev table size {0} is not a prime number (use e.g. 65537, 16381, 251)")]
    SizeNotPrime(u32),
    #[error(
        "Maglev table size {size} is too small for {backends} backends (needs more slots than backends)"
    )]
    TooSmall { size: u32, backends: usize },
    #[error("backend {0} is listed twice")]
    DuplicateBackend(IpAddr),
}

/// A complete Maglev lookup table: slot `i` holds the backend for flows whose hash maps to `i`
/// (see [`maglev_slot`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Vec<BackendId>,
}

impl MaglevTable {
    /// Builds the table of `size` slots (a prime) for `backends`. Backends of weight 0 are left
    /// out; with none left, every slot is [`NO_BACKEND`].
    pub fn build(size: u32, backends: &[MaglevBackend]) -> Result<Self, MaglevError> {
        if !is_prime(size) {
            return Err(MaglevError::SizeNotPrime(size));
        }
        let mut sorted: Vec<MaglevBackend> = backends.to_vec();
        sorted.sort_by_key(|b| b.addr);
        if let Some(pair) = sorted.windows(2).find(|w| w[0].addr == w[1].addr) {
            return Err(MaglevError::DuplicateBackend(pair[0].addr));
        }
        sorted.retain(|b| b.weight > 0);
        if sorted.len() >= size as usize {
            return Err(MaglevError::TooSmall {
                size,
                backends: sorted.len(),
            });
        }
        let mut slots = vec![NO_BACKEND; size as usize];
        if sorted.is_empty() {
            return Ok(Self { slots });
        }

        let m = u64::from(size);
        let divisor = sorted.iter().fold(0, |g, b| gcd(g, b.weight));
        let mut walkers: Vec<Walker> = sorted
            .iter()
            .map(|b| {
                let (bytes, _) = addr_bytes(b.addr);
                Walker {
                    id: b.id,
                    claims_per_round: b.weight / divisor,
                    next: backend_hash(&bytes, OFFSET_SALT) % m,
                    skip: backend_hash(&bytes, SKIP_SALT) % (m - 1) + 1,
                }
            })
            .collect();

        let mut filled = 0u64;
        'fill: loop {
            for w in walkers.iter_mut() {
                for _ in 0..w.claims_per_round {
                    // Each walker visits a permutation of all slots, so a free one is found.
                    while slots[w.next as usize] != NO_BACKEND {
                        w.advance(m);
                    }
                    slots[w.next as usize] = w.id;
                    w.advance(m);
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Ok(Self { slots })
    }

    /// The table's slots in order, as written to the `MAGLEV` map.
    pub fn slots(&self) -> &[BackendId] {
        &self.slots
    }

    /// The backend for a flow hash, as the datapath computes it.
    pub fn lookup(&self, hash: u32) -> BackendId {
        self.slots[maglev_slot(hash, self.slots.len() as u32) as usize]
    }

    /// Slots held by `id`.
    pub fn share(&self, id: BackendId) -> usize {
        self.slots.iter().filter(|&&s| s == id).count()
    }

    /// Slots whose backend differs between two tables of the same size.
    pub fn moved_slots(&self, other: &MaglevTable) -> usize {
        self.slots
            .iter()
            .zip(&other.slots)
            .filter(|(a, b)| a != b)
            .count()
    }
}

/// A backend's position in its permutation: slot `(offset + j * skip) % M` for j = 0, 1, ...
struct Walker {
    id: BackendId,
    claims_per_round: u32,
    next: u64,
    skip: u64,
}

impl Walker {
    fn advance(&mut self, m: u64) {
        self.next += self.skip;
        if self.next >= m {
            self.next -= m;
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Trial division; table sizes are at most a few million.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backends(n: u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                addr: IpAddr::V4(Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8)),
                weight: 1,
                id: i,
            })
            .collect()
    }

    #[test]
    fn equal_weights_balance_to_one_slot() {
        for n in [1, 3, 10, 100] {
            let t = MaglevTable::build(65_537, &backends(n)).unwrap();
            let shares: Vec<usize> = (0..n).map(|id| t.share(id)).collect();
            let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: min {min} max {max}");
            assert_eq!(shares.iter().sum::<usize>(), 65_537);
        }
    }

    #[test]
    fn removing_one_backend_moves_little_else() {
        let all = backends(10);
        let before = MaglevTable::build(65_537, &all).unwrap();
        let after = MaglevTable::build(65_537, &all[1..]).unwrap();
        let own = before.share(0);
        let moved = before.moved_slots(&after);
        let collateral = moved - own;
        // The paper reports a few percent of collateral movement at this size; allow 5% of M.
        assert!(
            collateral < 65_537 / 20,
            "removing 1 of 10 moved {collateral} slots beyond its own {own}"
        );
        // And the removed backend's slots are all gone.
        assert_eq!(after.share(0), 0);
    }

    #[test]
    fn weights_give_proportional_shares() {
        let mut b = backends(3);
        b[0].weight = 1;
        b[1].weight = 2;
        b[2].weight = 3;
        let t = MaglevTable::build(65_537, &b).unwrap();
        let unit = 65_537.0 / 6.0;
        for (id, w) in [(0u32, 1.0), (1, 2.0), (2, 3.0)] {
            let share = t.share(id) as f64;
            assert!(
                (share - w * unit).abs() < 0.01 * 65_537.0,
                "backend {id} weight {w}: {share} slots, expected about {}",
                w * unit
            );
        }
    }

    #[test]
    fn table_ignores_list_order_and_ids_only_label() {
        let b = backends(7);
        let mut reversed = b.clone();
        reversed.reverse();
        assert_eq!(
            MaglevTable::build(251, &b).unwrap(),
            MaglevTable::build(251, &reversed).unwrap()
        );
        // Relabelled ids: same addresses land in the same slots.
        let relabelled: Vec<_> = b
            .iter()
            .map(|x| MaglevBackend {
                id: x.id + 100,
                ..*x
            })
            .collect();
        let t1 = MaglevTable::build(251, &b).unwrap();
        let t2 = MaglevTable::build(251, &relabelled).unwrap();
        assert!(
            t1.slots()
                .iter()
                .zip(t2.slots())
                .all(|(a, b)| a + 100 == *b)
        );
    }

    #[test]
    fn edge_cases() {
        let one = MaglevTable::build(251, &backends(1)).unwrap();
        assert!(one.slots().iter().all(|&s| s == 0));

        let none = MaglevTable::build(251, &[]).unwrap();
        assert!(none.slots().iter().all(|&s| s == NO_BACKEND));

        let mut drained = backends(2);
        drained[0].weight = 0;
        drained[1].weight = 0;
        let t = MaglevTable::build(251, &drained).unwrap();
        assert!(t.slots().iter().all(|&s| s == NO_BACKEND));

        let mut dup = backends(3);
        dup[2].addr = dup[0].addr;
        assert_eq!(
            MaglevTable::build(251, &dup),
            Err(MaglevError::DuplicateBackend(dup[0].addr))
        );
        assert_eq!(
            MaglevTable::build(65_536, &backends(2)),
            Err(MaglevError::SizeNotPrime(65_536))
        );
        assert!(matches!(
            MaglevTable::build(5, &backends(5)),
            Err(MaglevError::TooSmall { .. })
        ));
    }

    #[test]
    fn ipv6_and_ipv4_backends_mix() {
        let b = vec![
            MaglevBackend {
                addr: "fd00::1".parse().unwrap(),
                weight: 1,
                id: 0,
            },
            MaglevBackend {
                addr: "198.18.0.1".parse().unwrap(),
                weight: 1,
                id: 1,
            },
        ];
        let t = MaglevTable::build(251, &b).unwrap();
        assert!(t.share(0).abs_diff(t.share(1)) <= 1);
    }
}
