//! How VIPs reach the routers: vip's own BGP speaker, or routes in a kernel table that a
//! routing daemon on the node announces. Either is given the same announcement set: the VIPs
//! this node can forward, marked GRACEFUL_SHUTDOWN while they drain.

mod kernel;

use std::time::Duration;

use crate::{
    bgp::{Sessions, Speaker, session::Route},
    config::Config,
};

pub(crate) use kernel::KernelAnnouncer;

/// Why the announcer could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnnounceError {
    #[error("kernel routes")]
    Routes(#[from] crate::net::routes::RoutesError),
    #[error("BFD")]
    Bfd(#[from] crate::bfd::BfdError),
}

/// The node's announcer.
pub(crate) enum Announcer {
    Bgp(Box<Speaker>),
    Kernel(KernelAnnouncer),
}

impl Announcer {
    /// Starts what `config` asks for (nothing without `[bgp]` or kernel routes), announcing
    /// `routes`. `restarted`: this agent took over a running datapath.
    pub(crate) async fn start(
        config: &Config,
        routes: Vec<Route>,
        restarted: bool,
        bfd_listener: Option<crate::bfd::Listener>,
    ) -> Result<Option<Self>, AnnounceError> {
        if let Some(bgp) = &config.bgp {
            let speaker = Speaker::start(bgp, routes, restarted, bfd_listener)?;
            return Ok(Some(Announcer::Bgp(Box::new(speaker))));
        }
        match &config.kernel_routes {
            Some(k) => Ok(Some(Announcer::Kernel(
                KernelAnnouncer::start(k, routes).await?,
            ))),
            None => Ok(None),
        }
    }

    /// Applies a reload's BGP settings to the running sessions (kernel mode has none).
    pub(crate) async fn reconfigure(&mut self, config: &Config) -> Result<(), AnnounceError> {
        if let (Announcer::Bgp(s), Some(bgp)) = (self, &config.bgp) {
            s.reconfigure(bgp).await?;
        }
        Ok(())
    }

    /// Replaces the announcement set.
    pub(crate) fn announce(&self, routes: Vec<Route>) {
        match self {
            Announcer::Bgp(s) => s.announce(routes),
            Announcer::Kernel(k) => k.announce(routes),
        }
    }

    /// The announcement set now.
    pub(crate) fn routes(&self) -> Vec<Route> {
        match self {
            Announcer::Bgp(s) => s.routes(),
            Announcer::Kernel(k) => k.routes(),
        }
    }

    /// Waits until the current set has reached the routers (or the kernel), at most `within`.
    pub(crate) async fn sent(&self, within: Duration) {
        match self {
            Announcer::Bgp(s) => s.sent(within).await,
            Announcer::Kernel(k) => k.sent(within).await,
        }
    }

    /// BGP sessions, for status and metrics (none in kernel mode).
    pub(crate) fn sessions(&self) -> Sessions {
        match self {
            Announcer::Bgp(s) => s.sessions(),
            Announcer::Kernel(_) => Sessions::default(),
        }
    }

    /// Ends announcing for an agent restart: BGP sessions close as a restarting speaker's
    /// (peers with graceful restart keep the routes), kernel routes stay for the next agent.
    pub(crate) async fn restart(self) {
        match self {
            Announcer::Bgp(s) => s.restart().await,
            Announcer::Kernel(k) => k.restart(),
        }
    }

    /// Stops announcing: routes are kept, draining, for `drain`, then withdrawn.
    pub(crate) async fn stop(self, drain: Duration) {
        match self {
            Announcer::Bgp(s) => s.stop(drain).await,
            Announcer::Kernel(k) => k.stop(drain).await,
        }
    }
}

/// How long announcements drain before they are withdrawn (`bgp.drain_time` or the kernel
/// routes' `drain_time`).
pub(crate) fn drain_time(config: &Config) -> Duration {
    config
        .bgp
        .as_ref()
        .map(|b| b.drain_time)
        .or(config.kernel_routes.as_ref().map(|k| k.drain_time))
        .unwrap_or(Duration::ZERO)
}
