//! Backend health checks: one task per (VIP, backend), concurrent, each bounded by its timeout
//! so a slow or hung backend never delays the others, and spread over the interval so a
//! restart does not check every backend at the same instant.
//!
//! A check goes to the backend's own address, or (`via = "datapath"`) to the VIP from the node's
//! own address, marked so that the datapath's `vip_hc` program carries it to the backend
//! encapsulated like client traffic; the backend answers directly, as it answers clients.
//!
//! The tasks only probe and report each result; the verdict ([`Verdict`]) is kept by the
//! runtime, the one owner of a backend's status.

mod probe;
mod tls;
pub(crate) mod verdict;

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, sleep},
};
use vip_common::{BackendId, HEALTH_CHECK_MARK};

pub(crate) use probe::ProbeError;
pub(crate) use verdict::Verdict;

use crate::{
    apply::BackendKey,
    config::{CheckKind, CheckVia, Config, HealthCheck},
};
use probe::Target;

/// One check's result.
#[derive(Debug)]
pub(crate) struct Observation {
    pub key: BackendKey,
    pub latency: Duration,
    pub result: Result<(), ProbeError>,
    pub through_datapath: bool,
}

impl Observation {
    /// The result in words, causes included.
    pub(crate) fn detail(&self) -> String {
        match &self.result {
            Ok(()) if self.through_datapath => {
                format!("ok in {:.1?} through the data path", self.latency)
            }
            Ok(()) => format!("ok in {:.1?}", self.latency),
            Err(e) => crate::errors::chain(e),
        }
    }
}

/// Runs the checks of every backend that has one.
pub(crate) struct Checker {
    tasks: HashMap<BackendKey, (HealthCheck, Target, JoinHandle<()>)>,
    results: mpsc::Sender<Observation>,
}

impl Checker {
    pub(crate) fn new() -> (Self, mpsc::Receiver<Observation>) {
        let (results, rx) = mpsc::channel(1024);
        (
            Self {
                tasks: HashMap::new(),
                results,
            },
            rx,
        )
    }

    /// Makes the running checks those of `config`: starts new ones, stops removed ones,
    /// restarts changed ones. `ids`: the backends' ids in the datapath, which data-path checks
    /// carry in their mark.
    pub(crate) fn sync(&mut self, config: &Config, ids: impl Fn(&BackendKey) -> Option<BackendId>) {
        let mut wanted: HashMap<BackendKey, (HealthCheck, Target)> = HashMap::new();
        for vip in &config.vips {
            for b in &vip.backends {
                if b.health.kind == CheckKind::None {
                    continue;
                }
                let key = (vip.key(), b.address);
                let target = match b.health.via {
                    CheckVia::Direct => Target::Direct(SocketAddr::new(b.address, b.health.port)),
                    CheckVia::Datapath => {
                        // Validation made sure the node has a source of the VIP's family.
                        let source = match vip.address {
                            IpAddr::V4(_) => config.node.source_v4.map(IpAddr::V4),
                            IpAddr::V6(_) => config.node.source_v6.map(IpAddr::V6),
                        };
                        let (Some(source), Some(id)) = (source, ids(&key)) else {
                            tracing::warn!(vip = %vip.address, backend = %b.address, "no data-path check: no source address or backend id");
                            continue;
                        };
                        Target::Datapath {
                            vip: SocketAddr::new(vip.address, b.health.port),
                            source,
                            mark: HEALTH_CHECK_MARK | id,
                        }
                    }
                };
                wanted.insert(key, (b.health.clone(), target));
            }
        }
        self.tasks.retain(|key, (check, target, task)| {
            let keep = wanted.get(key) == Some(&(check.clone(), *target));
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, (check, target)) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(run(key, check.clone(), target, self.results.clone()));
            self.tasks.insert(key, (check, target, task));
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, _, task) in self.tasks.values() {
            task.abort();
        }
    }
}

/// Where in the interval a backend's checks fall: fixed per backend, spread over all of them.
fn offset(key: &BackendKey, interval: Duration) -> Duration {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    interval.mul_f64((h.finish() % 1000) as f64 / 1000.0)
}

async fn run(
    key: BackendKey,
    check: HealthCheck,
    target: Target,
    results: mpsc::Sender<Observation>,
) {
    let mut next = Instant::now() + offset(&key, check.interval);
    loop {
        tokio::time::sleep_until(next).await;
        next += check.interval;
        let started = Instant::now();
        let result = probe::probe(&target, &check).await;
        let observation = Observation {
            key,
            latency: started.elapsed(),
            result,
            through_datapath: matches!(target, Target::Datapath { .. }),
        };
        if results.send(observation).await.is_err() {
            return;
        }
        // A check that overran keeps to the schedule instead of piling up.
        if next < Instant::now() {
            next = Instant::now() + check.interval;
            sleep(Duration::ZERO).await;
        }
    }
}
