//! The one owner of every backend's run-time status (health verdict, run-time drain), and the
//! pure functions that derive from it and the config what every view shows: a backend's
//! condition, the maps' target, the `backends` lines.

use std::{collections::HashMap, time::Instant};

use crate::{
    apply::{BackendKey, BackendTarget, Target},
    config::{BackendConfig, CheckKind, Config, HealthCheck},
    egress,
    health::Verdict,
    view::{BackendView, CheckView, Condition},
};

/// A backend's run-time status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Status {
    /// The check it runs and the verdict of its checks; `None`: not checked (always up).
    pub(crate) health: Option<(HealthCheck, Verdict)>,
    /// Drained at run time (`vip-agent drain`).
    pub(crate) drained: bool,
}

/// Every configured backend's status.
#[derive(Clone, Debug, Default)]
pub(crate) struct BackendStatus {
    statuses: HashMap<BackendKey, Status>,
}

/// A backend's condition: one function, used by every view.
pub(crate) fn condition(config: &BackendConfig, status: Option<&Status>) -> Condition {
    match status {
        Some(Status {
            health: Some((_, verdict)),
            ..
        }) if !verdict.up() => Condition::Down,
        Some(Status { drained: true, .. }) => Condition::Drained,
        _ if config.table_weight() == 0 => Condition::Draining,
        _ => Condition::Active,
    }
}

impl BackendStatus {
    /// The statuses for `config`: backends that left are forgotten, new ones start up and
    /// undrained, and a backend whose check changed keeps its verdict (the new check starts
    /// counting from it). Run-time drains end here when `keep_drains` is false.
    pub(crate) fn sync(&mut self, config: &Config, keep_drains: bool, now: Instant) {
        let mut next = HashMap::with_capacity(self.statuses.len());
        for vip in &config.vips {
            for b in &vip.backends {
                let key = (vip.key(), b.address);
                let old = self.statuses.remove(&key);
                let drained = keep_drains && old.as_ref().is_some_and(|s| s.drained);
                let health = match (b.health.kind, old.and_then(|s| s.health)) {
                    (CheckKind::None, _) => None,
                    (_, Some((check, verdict))) if check == b.health => Some((check, verdict)),
                    (_, Some((_, mut verdict))) => {
                        verdict.restart();
                        Some((b.health.clone(), verdict))
                    }
                    (_, None) => Some((b.health.clone(), Verdict::new(now))),
                };
                next.insert(key, Status { health, drained });
            }
        }
        self.statuses = next;
    }

    pub(crate) fn get(&self, key: &BackendKey) -> Option<&Status> {
        self.statuses.get(key)
    }

    /// Records a check's result; returns the new verdict when it changed.
    pub(crate) fn record(
        &mut self,
        key: &BackendKey,
        ok: bool,
        detail: String,
        latency: std::time::Duration,
        now: Instant,
    ) -> Option<bool> {
        let (check, verdict) = self.statuses.get_mut(key)?.health.as_mut()?;
        verdict.record(ok, detail, latency, check, now)
    }

    /// Drains (or undrains) the backends `keys`; returns how many changed.
    pub(crate) fn set_drained(&mut self, keys: &[BackendKey], drained: bool) -> usize {
        let mut changed = 0;
        for key in keys {
            if let Some(s) = self.statuses.get_mut(key)
                && s.drained != drained
            {
                s.drained = drained;
                changed += 1;
            }
        }
        changed
    }

    /// What the maps should hold for `config` with these statuses and the egress blocks
    /// that rest at `now`.
    pub(crate) fn target(&self, config: &Config, blocks: &egress::Blocks, now: Instant) -> Target {
        Target::new(
            config,
            |key, b| {
                let condition = condition(b, self.get(key));
                BackendTarget {
                    address: b.address,
                    weight: match condition {
                        Condition::Active => b.table_weight(),
                        _ => 0,
                    },
                    present: condition != Condition::Down,
                }
            },
            |e, block| blocks.resting(e.vip, block, now).is_some(),
        )
    }

    /// One line per backend of each VIP, in config order.
    pub(crate) fn views(&self, config: &Config) -> Vec<BackendView> {
        config
            .vips
            .iter()
            .flat_map(|vip| {
                vip.backends.iter().map(move |b| {
                    let status = self.get(&(vip.key(), b.address));
                    BackendView {
                        vip: vip.name(),
                        address: b.address,
                        weight: b.weight,
                        condition: condition(b, status),
                        check: status
                            .and_then(|s| s.health.as_ref())
                            .map(|(_, v)| CheckView {
                                up: v.up(),
                                detail: v.detail.clone(),
                                latency: v.latency,
                                changes: v.changes,
                                durations: v.durations.clone(),
                            }),
                    }
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::*;
    use crate::config;

    fn config(interval: &str) -> Config {
        let text = format!(
            "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"192.0.2.10\"\n\
             [[vip]]\naddress = \"198.51.100.1\"\nprotocol = \"tcp\"\nport = 80\n\
             [vip.health]\ncheck = \"tcp\"\ninterval = {interval}\ntimeout = 0.05\nrise = 2\nfall = 1\n\
             [[vip.backend]]\naddress = \"192.0.2.21\"\n"
        );
        config::parse(Path::new("t.toml"), &text).unwrap()
    }

    /// Issue #14's first defect, on the host: a backend marked down, then a reload that only
    /// changes its check's interval. The backend stays down (its verdict is kept) until its
    /// new check passes `rise` times, and then it is up everywhere: in the target, in the
    /// views, and no second copy can say otherwise.
    #[test]
    fn a_reload_that_changes_a_check_keeps_the_verdict_and_lets_it_rise() {
        let t0 = Instant::now();
        let old = config("0.1");
        let key = (old.vips[0].key(), old.vips[0].backends[0].address);
        let mut status = BackendStatus::default();
        let no_rests = egress::Blocks::default();
        status.sync(&old, true, t0);
        assert_eq!(
            status.record(&key, false, "refused".into(), Duration::ZERO, t0),
            Some(false)
        );
        assert_eq!(
            status.target(&old, &no_rests, t0).vips[0].backends[0].weight,
            0
        );

        let new = config("0.2");
        status.sync(&new, false, t0);
        let views = status.views(&new);
        assert_eq!(views[0].condition, Condition::Down);
        assert!(!status.target(&new, &no_rests, t0).vips[0].backends[0].present);
        assert_eq!(
            status.record(&key, true, "ok".into(), Duration::ZERO, t0),
            None
        );
        assert_eq!(
            status.record(&key, true, "ok".into(), Duration::ZERO, t0),
            Some(true)
        );
        let views = status.views(&new);
        assert_eq!(views[0].condition, Condition::Active);
        assert!(views[0].check.as_ref().unwrap().up);
        assert_eq!(
            status.target(&new, &no_rests, t0).vips[0].backends[0].weight,
            1
        );
    }

    #[test]
    fn backends_that_leave_are_forgotten_and_drains_end_with_a_reload() {
        let t0 = Instant::now();
        let cfg = config("1");
        let key = (cfg.vips[0].key(), cfg.vips[0].backends[0].address);
        let mut status = BackendStatus::default();
        status.sync(&cfg, true, t0);
        assert_eq!(status.set_drained(&[key], true), 1);
        assert_eq!(status.views(&cfg)[0].condition, Condition::Drained);
        status.sync(&cfg, true, t0);
        assert_eq!(status.views(&cfg)[0].condition, Condition::Drained);
        status.sync(&cfg, false, t0);
        assert_eq!(status.views(&cfg)[0].condition, Condition::Active);
        let mut empty = cfg.clone();
        empty.vips[0].backends.clear();
        status.sync(&empty, false, t0);
        assert!(status.get(&key).is_none());
    }
}
