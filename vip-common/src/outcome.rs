//! What became of a packet in the load balancer: the one vocabulary that the datapath's counters
//! and debug log, the agent's metrics and `vip-agent status` all use. Adding an outcome is adding
//! a variant (and its `DatapathStats` field); every `match` below then fails to compile until the
//! new outcome has its counter, log text and label.

use crate::maps::DatapathStats;

/// The outcome of one packet through `vip_lb`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not for a VIP (or not IP/TCP/UDP): passed to the stack untouched.
    Passed = 0,
    /// Encapsulated and sent back out of the arrival interface.
    Tx = 1,
    /// Encapsulated and redirected to another interface.
    Redirected = 2,
    /// Encapsulated, next hop not resolved and the FIB has no neighbour yet: to the stack.
    NoNeighbourPassed = 3,
    /// Encapsulated, and the FIB has no route (or the interface does not forward): to the stack.
    NoRoutePassed = 4,
    /// An IPv4 fragment to a VIP that hashes on ports.
    DropFragment = 5,
    /// An IPv4 packet with options to a VIP.
    DropIpOptions = 6,
    /// A packet to a VIP with inconsistent lengths or a truncated transport header.
    DropMalformed = 7,
    /// A packet to a VIP without a usable backend.
    DropNoBackend = 8,
    /// No headroom for the outer header.
    DropNoHeadroom = 9,
}

impl Outcome {
    /// Every outcome, in code order.
    pub const ALL: [Outcome; 10] = [
        Outcome::Passed,
        Outcome::Tx,
        Outcome::Redirected,
        Outcome::NoNeighbourPassed,
        Outcome::NoRoutePassed,
        Outcome::DropFragment,
        Outcome::DropIpOptions,
        Outcome::DropMalformed,
        Outcome::DropNoBackend,
        Outcome::DropNoHeadroom,
    ];

    /// Its number (handed from `vip_lb` to its log program).
    #[inline(always)]
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The outcome of a code; unknown codes read as the last drop.
    #[inline(always)]
    pub const fn from_code(code: u32) -> Self {
        match code {
            0 => Outcome::Passed,
            1 => Outcome::Tx,
            2 => Outcome::Redirected,
            3 => Outcome::NoNeighbourPassed,
            4 => Outcome::NoRoutePassed,
            5 => Outcome::DropFragment,
            6 => Outcome::DropIpOptions,
            7 => Outcome::DropMalformed,
            8 => Outcome::DropNoBackend,
            _ => Outcome::DropNoHeadroom,
        }
    }

    /// The XDP action the program returns (`XDP_DROP` 1, `XDP_PASS` 2, `XDP_TX` 3,
    /// `XDP_REDIRECT` 4, as the kernel numbers them).
    #[inline(always)]
    pub const fn xdp_action(self) -> u32 {
        match self {
            Outcome::Passed | Outcome::NoNeighbourPassed | Outcome::NoRoutePassed => 2,
            Outcome::Tx => 3,
            Outcome::Redirected => 4,
            Outcome::DropFragment
            | Outcome::DropIpOptions
            | Outcome::DropMalformed
            | Outcome::DropNoBackend
            | Outcome::DropNoHeadroom => 1,
        }
    }

    /// Whether the packet was dropped (else it was forwarded or passed).
    #[inline(always)]
    pub const fn is_drop(self) -> bool {
        self.code() >= Outcome::DropFragment.code()
    }

    /// Whether the packet left encapsulated toward a backend (its log record names one).
    #[inline(always)]
    pub const fn encapsulated(self) -> bool {
        matches!(
            self,
            Outcome::Tx | Outcome::Redirected | Outcome::NoNeighbourPassed | Outcome::NoRoutePassed
        )
    }

    /// Its words in the datapath's debug log. Branches, not a table: a string pointer loaded
    /// from a table is a plain number to the verifier.
    #[inline(always)]
    pub const fn log_text(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Tx => "XDP_TX",
            Outcome::Redirected => "redirect",
            Outcome::NoNeighbourPassed => "no neighbour yet, to the stack",
            Outcome::NoRoutePassed => "no route, to the stack",
            Outcome::DropFragment => "dropped: fragment",
            Outcome::DropIpOptions => "dropped: IP options",
            Outcome::DropMalformed => "dropped: malformed",
            Outcome::DropNoBackend => "dropped: no backend",
            Outcome::DropNoHeadroom => "dropped: no headroom",
        }
    }

    /// Its Prometheus label value: `outcome` of `vip_datapath_packets_total`, or `reason` of
    /// `vip_datapath_drops_total` for drops.
    pub const fn label(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Tx => "tx",
            Outcome::Redirected => "redirected",
            Outcome::NoNeighbourPassed => "no_neighbour_passed",
            Outcome::NoRoutePassed => "no_route_passed",
            Outcome::DropFragment => "fragment",
            Outcome::DropIpOptions => "ip_options",
            Outcome::DropMalformed => "malformed",
            Outcome::DropNoBackend => "no_backend",
            Outcome::DropNoHeadroom => "no_headroom",
        }
    }

    /// Its words in `vip-agent status`.
    pub const fn status_text(self) -> &'static str {
        match self {
            Outcome::Passed => "passed (not for a VIP)",
            Outcome::Tx => "sent (XDP_TX)",
            Outcome::Redirected => "redirected",
            Outcome::NoNeighbourPassed => "to the stack for neighbour resolution",
            Outcome::NoRoutePassed => "to the stack without a route",
            Outcome::DropFragment => "fragments",
            Outcome::DropIpOptions => "IP options",
            Outcome::DropMalformed => "malformed",
            Outcome::DropNoBackend => "no backend",
            Outcome::DropNoHeadroom => "no headroom",
        }
    }
}

impl DatapathStats {
    /// Counts one packet with `outcome`.
    #[inline(always)]
    pub fn count(&mut self, outcome: Outcome) {
        *self.counter(outcome) += 1;
    }

    /// Packets counted with `outcome`.
    pub fn of(&self, outcome: Outcome) -> u64 {
        let mut copy = *self;
        *copy.counter(outcome)
    }

    #[inline(always)]
    fn counter(&mut self, outcome: Outcome) -> &mut u64 {
        match outcome {
            Outcome::Passed => &mut self.passed,
            Outcome::Tx => &mut self.tx,
            Outcome::Redirected => &mut self.redirected,
            Outcome::NoNeighbourPassed => &mut self.no_neighbour_passed,
            Outcome::NoRoutePassed => &mut self.no_route_passed,
            Outcome::DropFragment => &mut self.drop_fragment,
            Outcome::DropIpOptions => &mut self.drop_ip_options,
            Outcome::DropMalformed => &mut self.drop_malformed,
            Outcome::DropNoBackend => &mut self.drop_no_backend,
            Outcome::DropNoHeadroom => &mut self.drop_no_headroom,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_every_outcome_has_its_own_counter() {
        let mut stats = DatapathStats::default();
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(Outcome::from_code(o.code()), *o);
            for _ in 0..=i {
                stats.count(*o);
            }
        }
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(stats.of(*o), i as u64 + 1, "{o:?}");
        }
        for (i, a) in Outcome::ALL.iter().enumerate() {
            for b in &Outcome::ALL[i + 1..] {
                assert_ne!(a.label(), b.label());
            }
        }
    }
}
