//! Whether a backend passes its health checks, from the results of its checks: a pure state
//! machine (time is an argument), so it is tested on the host.
//!
//! A backend goes down after `fall` failures in a row and comes back after `rise` successes.
//! Flapping is damped: a backend that comes back and goes down again within ten intervals
//! needs twice as many successes the next time (up to 16 × `rise`); ten quiet intervals reset it.

use std::time::{Duration, Instant};

use crate::config::HealthCheck;

/// The verdict on one backend and what it rests on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    up: bool,
    successes: u32,
    failures: u32,
    flaps: u32,
    last_change: Instant,
    /// Up/down changes so far.
    pub changes: u64,
    /// The latest check's outcome in words.
    pub detail: String,
    pub latency: Duration,
    /// Every check's duration, for the metrics' histogram.
    pub durations: Durations,
}

/// Check durations in histogram buckets.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Durations {
    /// Checks that took at most `Durations::BOUNDS[i]` (and more than the bound before); the
    /// last entry counts the slower ones.
    pub counts: [u64; Durations::BOUNDS.len() + 1],
    pub sum: Duration,
}

impl Durations {
    /// Upper bounds in seconds: a LAN check takes a millisecond, a timed-out one its timeout.
    pub const BOUNDS: [f64; 11] = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
    ];

    fn record(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let bucket = Self::BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(Self::BOUNDS.len());
        self.counts[bucket] += 1;
        self.sum += d;
    }

    /// (upper bound, checks in that bucket alone), `+Inf` last (as `f64::MAX`, which the
    /// encoder writes `+Inf`); the encoder sums them up.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        Self::BOUNDS
            .iter()
            .chain([f64::MAX].iter())
            .zip(&self.counts)
            .map(|(bound, n)| (*bound, *n))
            .collect()
    }
}

impl Verdict {
    /// A backend not checked yet: up (a new backend takes traffic until its checks say
    /// otherwise, as a restarted agent's backends do).
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            up: true,
            successes: 0,
            failures: 0,
            flaps: 0,
            last_change: now,
            changes: 0,
            detail: "not checked yet".into(),
            latency: Duration::ZERO,
            durations: Durations::default(),
        }
    }

    pub(crate) fn up(&self) -> bool {
        self.up
    }

    /// The check's settings changed: the verdict stays, counting starts afresh.
    pub(crate) fn restart(&mut self) {
        self.successes = 0;
        self.failures = 0;
    }

    /// Records one check's result; returns the new verdict when it changed.
    pub(crate) fn record(
        &mut self,
        ok: bool,
        detail: String,
        latency: Duration,
        check: &HealthCheck,
        now: Instant,
    ) -> Option<bool> {
        self.detail = detail;
        self.latency = latency;
        self.durations.record(latency);
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let quiet = now.duration_since(self.last_change) > check.interval * 10;
        if quiet {
            self.flaps = 0;
        }
        let needed = check.rise << self.flaps.min(4);
        let new = if self.up && self.failures >= check.fall {
            false
        } else if !self.up && self.successes >= needed {
            true
        } else {
            return None;
        };
        // Down again soon after coming back up (a first failure is no flap).
        if !new && !quiet && self.changes > 0 {
            self.flaps += 1;
        }
        self.up = new;
        self.last_change = now;
        self.changes += 1;
        Some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn durations_fall_in_their_buckets() {
        let mut d = Durations::default();
        for ms in [0.3, 0.5, 3.0, 2000.0, 9000.0] {
            d.record(Duration::from_secs_f64(ms / 1e3));
        }
        let b = d.buckets();
        assert_eq!(b[0], (0.0005, 2), "0.5 ms is in the 0.5 ms bucket");
        assert_eq!(b[3], (0.005, 1));
        assert_eq!(b[10], (5.0, 1));
        assert_eq!(b[11], (f64::MAX, 1), "slower than every bound");
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), 5);
        assert_eq!(d.sum, Duration::from_secs_f64(11.0038));
    }

    fn check(rise: u32, fall: u32) -> HealthCheck {
        let text = format!(
            "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"192.0.2.10\"\n\
             [[vip]]\naddress = \"198.51.100.1\"\nprotocol = \"tcp\"\nport = 80\n\
             [vip.health]\ncheck = \"tcp\"\ninterval = 1\nrise = {rise}\nfall = {fall}\n\
             [[vip.backend]]\naddress = \"192.0.2.21\"\n"
        );
        let cfg = config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        cfg.vips[0].backends[0].health.clone()
    }

    /// Records one check result a second for each step, from second `from`, and checks what
    /// each one changed.
    fn steps(v: &mut Verdict, check: &HealthCheck, from: u64, steps: &[(bool, Option<bool>)]) {
        let t0 = v.last_change;
        for (i, &(ok, change)) in steps.iter().enumerate() {
            let at = t0 + Duration::from_secs(from + i as u64);
            assert_eq!(
                v.record(ok, String::new(), Duration::ZERO, check, at),
                change,
                "step {i}"
            );
        }
    }

    #[test]
    fn down_after_fall_failures_up_after_rise_successes() {
        let check = check(2, 3);
        let mut v = Verdict::new(Instant::now());
        let (fail, pass) = (false, true);
        steps(
            &mut v,
            &check,
            1,
            &[
                (fail, None),
                (fail, None),
                (fail, Some(false)),
                (pass, None),
                (pass, Some(true)),
            ],
        );
        assert_eq!(v.changes, 2);
    }

    /// A restarted check (its settings changed) keeps the verdict: a down backend comes back
    /// only after `rise` successes, and says so.
    #[test]
    fn a_restarted_check_starts_from_the_current_verdict() {
        let check = check(2, 1);
        let mut v = Verdict::new(Instant::now());
        steps(&mut v, &check, 1, &[(false, Some(false))]);
        v.restart();
        assert!(!v.up());
        steps(&mut v, &check, 2, &[(true, None), (true, Some(true))]);
    }

    #[test]
    fn flapping_needs_more_successes() {
        let check = check(1, 1);
        let mut v = Verdict::new(Instant::now());
        // Down, up, and down again within ten intervals: a flap; now two successes are needed.
        steps(
            &mut v,
            &check,
            1,
            &[
                (false, Some(false)),
                (true, Some(true)),
                (false, Some(false)),
                (true, None),
                (true, Some(true)),
            ],
        );
    }
}
