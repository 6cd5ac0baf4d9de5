//! Announcer mode `kernel`: a task keeps the kernel table equal to the announcement set. A
//! route marked GRACEFUL_SHUTDOWN (a drain) stays for the drain time, then goes: a routing
//! daemon that reads the table has no community to carry, so the drain is the delay.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, sleep_until},
};

use crate::{
    bgp::session::{GRACEFUL_SHUTDOWN, Route},
    config::KernelRoutesConfig,
    net::routes::{KernelRoutes, RoutesError},
};

/// The task that writes the table, and how to reach it.
pub(crate) struct KernelAnnouncer {
    routes: watch::Sender<Vec<Route>>,
    /// How many routes the table holds, after each sync.
    installed: watch::Receiver<usize>,
    task: JoinHandle<()>,
    table: KernelRoutesConfig,
}

/// The prefixes that belong in the table now, and when the next draining one is due to go.
fn due(
    routes: &[Route],
    draining_since: &mut HashMap<IpAddr, Instant>,
    drain: Duration,
    now: Instant,
) -> (Vec<IpAddr>, Option<Instant>) {
    draining_since.retain(|p, _| {
        routes
            .iter()
            .any(|r| r.prefix == *p && r.communities.contains(&GRACEFUL_SHUTDOWN))
    });
    let mut wanted = Vec::new();
    let mut next = None::<Instant>;
    for r in routes {
        if r.communities.contains(&GRACEFUL_SHUTDOWN) {
            let until = *draining_since.entry(r.prefix).or_insert(now) + drain;
            if until <= now {
                continue;
            }
            next = Some(next.map_or(until, |n| n.min(until)));
        }
        wanted.push(r.prefix);
    }
    (wanted, next)
}

impl KernelAnnouncer {
    /// Writes `routes` into the table and keeps it current.
    pub(crate) async fn start(
        config: &KernelRoutesConfig,
        routes: Vec<Route>,
    ) -> Result<Self, RoutesError> {
        let table = KernelRoutes::new(config.table, config.protocol).await?;
        let (routes_tx, mut routes_rx) = watch::channel(routes);
        let (installed_tx, installed) = watch::channel(0);
        let drain = config.drain_time;
        let task = tokio::spawn(async move {
            let mut draining_since = HashMap::new();
            let mut wake = None::<Instant>;
            loop {
                let current = routes_rx.borrow_and_update().clone();
                let (wanted, next) = due(&current, &mut draining_since, drain, Instant::now());
                match table.sync(&wanted).await {
                    Ok((0, 0)) => {}
                    Ok((added, removed)) => tracing::info!(added, removed, "kernel routes"),
                    Err(e) => {
                        tracing::error!(error = %crate::errors::chain(&e), "writing kernel routes");
                    }
                }
                installed_tx.send_replace(wanted.len());
                wake = next.or(wake.filter(|w| *w > Instant::now()));
                tokio::select! {
                    changed = routes_rx.changed() => if changed.is_err() { return },
                    () = sleep_until(wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))) => wake = None,
                }
            }
        });
        Ok(Self {
            routes: routes_tx,
            installed,
            task,
            table: config.clone(),
        })
    }

    pub(crate) fn announce(&self, routes: Vec<Route>) {
        self.routes.send_replace(routes);
    }

    pub(crate) fn routes(&self) -> Vec<Route> {
        self.routes.borrow().clone()
    }

    /// Waits until the table holds the current set (draining routes included), at most
    /// `within`.
    pub(crate) async fn sent(&self, within: Duration) {
        let wanted = self.routes.borrow().len();
        let mut installed = self.installed.clone();
        let _ = tokio::time::timeout(within, installed.wait_for(|n| *n == wanted)).await;
    }

    /// Leaves the routes in the table for the next agent, which takes them over.
    pub(crate) fn restart(self) {
        self.task.abort();
    }

    /// Keeps the routes for `drain`, then removes them all.
    pub(crate) async fn stop(self, drain: Duration) {
        if !drain.is_zero() {
            tracing::info!(
                ?drain,
                table = self.table.table,
                "draining: kernel routes stay for the drain time"
            );
            tokio::time::sleep(drain).await;
        }
        self.routes.send_replace(Vec::new());
        let mut installed = self.installed.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), installed.wait_for(|n| *n == 0)).await;
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, draining: bool) -> Route {
        Route {
            prefix: prefix.parse().unwrap(),
            communities: if draining {
                vec![GRACEFUL_SHUTDOWN]
            } else {
                vec![]
            },
            large_communities: vec![],
            med: None,
        }
    }

    /// A draining route stays for the drain time, counted from when it started to drain.
    #[test]
    fn draining_routes_stay_for_the_drain_time() {
        let t0 = Instant::now();
        let drain = Duration::from_secs(10);
        let mut since = HashMap::new();
        let routes = [route("198.19.0.1", false), route("198.19.0.2", true)];
        let (wanted, next) = due(&routes, &mut since, drain, t0);
        assert_eq!(wanted.len(), 2);
        assert_eq!(next, Some(t0 + drain));
        let (wanted, _) = due(&routes, &mut since, drain, t0 + Duration::from_secs(5));
        assert_eq!(wanted.len(), 2);
        let (wanted, next) = due(&routes, &mut since, drain, t0 + drain);
        assert_eq!(wanted, vec!["198.19.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(next, None);
        // Undrained and drained again: the drain time starts afresh.
        let (_, _) = due(&[route("198.19.0.2", false)], &mut since, drain, t0 + drain);
        let (wanted, _) = due(&routes, &mut since, drain, t0 + drain * 2);
        assert_eq!(wanted.len(), 2);
    }
}
