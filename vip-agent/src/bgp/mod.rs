//! vip's BGP speaker: announces VIPs (host routes, next hop self) to routers, never installs
//! what it receives.
//!
//! A VIP is announced while this node can forward it: the speaker starts after the XDP program
//! is attached, and only VIPs with a backend that takes new flows are in the announcement set.

pub mod session;
pub mod wire;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};

use vip_common::VipKey;

use crate::{
    bfd::{self, Bfd},
    config::{BgpConfig, Config},
};
use session::{GRACEFUL_SHUTDOWN, Local, Route, Status, Stop};

/// The announcement set: the VIPs of `config` that `usable` says can take new flows.
pub fn routes_for(config: &Config, usable: impl Fn(&VipKey) -> bool) -> Vec<Route> {
    let mut routes: Vec<Route> =
        config
            .vips
            .iter()
            .filter(|v| usable(&v.key()))
            .fold(Vec::<Route>::new(), |mut acc, v| {
                // Several VIPs (ports, protocols) share one address: one route, their communities.
                match acc.iter_mut().find(|r| r.prefix == v.address) {
                    Some(r) => {
                        r.communities.extend(&v.communities);
                        r.large_communities.extend(&v.large_communities);
                        r.med = r.med.or(v.med);
                    }
                    None => acc.push(Route {
                        prefix: v.address,
                        communities: v.communities.clone(),
                        large_communities: v.large_communities.clone(),
                        med: v.med,
                    }),
                }
                acc
            });
    for r in &mut routes {
        r.communities.sort();
        r.communities.dedup();
        r.large_communities.sort();
        r.large_communities.dedup();
    }
    routes.sort();
    routes
}

/// A handle on the sessions' states, for readers that must not wait for the runtime.
#[derive(Clone, Debug, Default)]
pub struct Sessions {
    bgp: Vec<(IpAddr, watch::Receiver<Status>)>,
    bfd: Vec<(IpAddr, watch::Receiver<bfd::Status>)>,
    bfd_refusals: Option<Arc<bfd::Refusals>>,
}

impl Sessions {
    /// Session states by peer.
    pub fn status(&self) -> Vec<(IpAddr, Status)> {
        self.bgp
            .iter()
            .map(|(a, s)| (*a, s.borrow().clone()))
            .collect()
    }

    /// BFD session states by peer (peers with BFD on).
    pub fn bfd(&self) -> Vec<(IpAddr, bfd::Status)> {
        self.bfd.iter().map(|(a, s)| (*a, *s.borrow())).collect()
    }

    /// Received BFD packets refused, by reason; `None` without BFD.
    pub fn bfd_refusals(&self) -> Option<Vec<(&'static str, u64)>> {
        self.bfd_refusals.as_ref().map(|r| r.counts())
    }
}

/// The running sessions.
pub struct Speaker {
    routes: watch::Sender<Vec<Route>>,
    shutdown: watch::Sender<Option<Stop>>,
    sessions: Vec<(IpAddr, watch::Receiver<Status>, JoinHandle<()>)>,
    listener: Option<JoinHandle<()>>,
    bfd: Option<Bfd>,
    settings: BgpConfig,
}

/// BGP's port, where passive peers connect.
pub const BGP_PORT: u16 = 179;

/// Connections the kernel queues for the listener.
const LISTEN_BACKLOG: u32 = 1024;

/// Logs refused connections at most once per interval, with how many were refused since.
#[derive(Default)]
struct RefusalLog {
    last: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn note(&mut self, from: IpAddr) {
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|t| now - t < Self::INTERVAL) {
            return;
        }
        tracing::warn!(
            %from,
            refused = self.unlogged,
            "BGP connections from unconfigured addresses refused (logged at most every 10 s)"
        );
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// Accepts BGP connections (`listen`, or some peer is passive) and hands each to the session
/// of the peer it comes from; connections from unconfigured addresses get Cease / connection
/// rejected.
fn listen(
    settings: &BgpConfig,
    peers: HashMap<IpAddr, mpsc::Sender<TcpStream>>,
) -> std::io::Result<JoinHandle<()>> {
    let socket = TcpSocket::new_v6()?;
    socket.set_reuseaddr(true)?;
    // Dual-stack: IPv4 peers arrive as v4-mapped addresses.
    socket.bind(SocketAddr::from((
        std::net::Ipv6Addr::UNSPECIFIED,
        BGP_PORT,
    )))?;
    for p in &settings.peers {
        if let Some(key) = &p.password {
            let mapped = match p.address {
                IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
                v6 => v6,
            };
            session::set_md5(&socket, SocketAddr::new(mapped, 0), key)?;
        }
    }
    // A flood of connections waits in the kernel's queue, not in SYN retries.
    let listener = socket.listen(LISTEN_BACKLOG)?;
    let refusal = wire::encode_notification(&wire::Notification::new(
        wire::code::CEASE,
        wire::code::CONNECTION_REJECTED,
        &[],
    ));
    Ok(tokio::spawn(async move {
        let mut refused = RefusalLog::default();
        while let Ok((stream, from)) = listener.accept().await {
            let from = from.ip().to_canonical();
            match peers.get(&from) {
                Some(tx) => {
                    let _ = tx.try_send(stream);
                }
                None => {
                    refused.note(from);
                    // Never waits: a stranger that does not read gets nothing more.
                    let _ = stream.try_write(&refusal);
                }
            }
        }
    }))
}

impl Speaker {
    /// Starts one session per peer, and a BFD session for each peer that has it.
    /// `restarted`: this agent took over a running datapath (sets the graceful-restart
    /// restart bit).
    pub fn start(
        settings: &BgpConfig,
        routes: Vec<Route>,
        restarted: bool,
    ) -> Result<Self, bfd::BfdError> {
        let bfd_peers: Vec<IpAddr> = settings
            .peers
            .iter()
            .filter(|p| p.bfd)
            .map(|p| p.address)
            .collect();
        let bfd = if bfd_peers.is_empty() {
            None
        } else {
            Some(Bfd::start(&bfd_peers, settings.bfd_timers)?)
        };
        let (routes_tx, _) = watch::channel(routes);
        let (shutdown_tx, _) = watch::channel(None);
        let local = Local {
            asn: settings.asn,
            router_id: settings.router_id,
            hold_time: settings.hold_time,
            graceful_restart: settings.graceful_restart_time,
            restarted,
            next_hop_v4: settings.next_hop_v4,
            next_hop_v6: settings.next_hop_v6,
        };
        // Listening before any session connects: a peer that answers our connection with its
        // own (a collision) must find the port open.
        let (inbound_tx, inbound_rx): (HashMap<_, _>, Vec<_>) = settings
            .peers
            .iter()
            .map(|p| {
                let (tx, rx) = mpsc::channel(4);
                ((p.address, tx), rx)
            })
            .unzip();
        let listener = if settings.listen {
            match listen(settings, inbound_tx) {
                Ok(task) => Some(task),
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen on BGP port {BGP_PORT}: peers cannot connect to us");
                    None
                }
            }
        } else {
            None
        };
        let sessions = settings
            .peers
            .iter()
            .zip(inbound_rx)
            .map(|(p, inbound_rx)| {
                // Node-wide communities first, then the peer's own.
                let mut peer = p.clone();
                peer.communities = [&settings.communities[..], &p.communities[..]].concat();
                peer.large_communities =
                    [&settings.large_communities[..], &p.large_communities[..]].concat();
                let (status_tx, status_rx) = watch::channel(Status::default());
                let task = tokio::spawn(session::run(
                    local.clone(),
                    peer,
                    routes_tx.subscribe(),
                    status_tx,
                    shutdown_tx.subscribe(),
                    inbound_rx,
                    bfd.as_ref().and_then(|b| b.session(p.address)),
                ));
                (p.address, status_rx, task)
            })
            .collect();
        Ok(Self {
            routes: routes_tx,
            shutdown: shutdown_tx,
            sessions,
            listener,
            bfd,
            settings: settings.clone(),
        })
    }

    /// New BFD timers (a reload): Up sessions change them through a Poll Sequence.
    pub fn set_bfd_timers(&self, timers: bfd::Timers) {
        if let Some(b) = &self.bfd {
            b.set_timers(timers);
        }
    }

    /// The settings the sessions run with (changes need a restart of the speaker).
    pub fn settings(&self) -> &BgpConfig {
        &self.settings
    }

    /// Replaces the announcement set; sessions send the difference.
    pub fn announce(&self, routes: Vec<Route>) {
        self.routes.send_replace(routes);
    }

    /// The sessions' states.
    pub fn sessions(&self) -> Sessions {
        Sessions {
            bgp: self
                .sessions
                .iter()
                .map(|(a, s, _)| (*a, s.clone()))
                .collect(),
            bfd: self.bfd.as_ref().map(Bfd::sessions).unwrap_or_default(),
            bfd_refusals: self.bfd.as_ref().map(Bfd::refusals),
        }
    }

    /// The routes announced now (or being announced).
    pub fn routes(&self) -> Vec<Route> {
        self.routes.borrow().clone()
    }

    /// Waits until every established session has sent the current announcement set (a
    /// withdrawal reaches the routers before the caller goes on), at most `within`.
    pub async fn sent(&self, within: Duration) {
        let wanted = self.routes.borrow().len();
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let done = self.sessions.iter().all(|(_, s, _)| {
                let s = s.borrow();
                s.state != session::State::Established || s.announced == wanted
            });
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops announcing: with a drain time, first re-announces everything with GRACEFUL_SHUTDOWN
    /// (RFC 8326) so routers move traffic away, waits, then withdraws and closes with Cease.
    pub async fn stop(self, drain: Duration) {
        if !drain.is_zero() {
            let draining: Vec<Route> = self
                .routes
                .borrow()
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.communities.push(GRACEFUL_SHUTDOWN);
                    r
                })
                .collect();
            tracing::info!(?drain, "draining: announcing with GRACEFUL_SHUTDOWN");
            self.routes.send_replace(draining);
            tokio::time::sleep(drain).await;
        }
        self.routes.send_replace(Vec::new());
        // Let the sessions send their withdrawals before the Cease.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.end(Stop::Withdraw).await;
    }

    /// Ends the sessions for an agent restart: no withdrawal, no NOTIFICATION; peers with
    /// graceful restart keep the routes while the pinned datapath forwards.
    pub async fn restart(self) {
        if self.settings.graceful_restart_time.is_none() {
            tracing::warn!(
                "restarting without graceful restart: routers drop the routes until the new agent announces them"
            );
        }
        self.end(Stop::Restart).await;
    }

    async fn end(self, stop: Stop) {
        self.shutdown.send_replace(Some(stop));
        if let Some(listener) = self.listener {
            listener.abort();
        }
        for (_, _, task) in self.sessions {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        // After the sessions' last words: BFD's AdminDown tells the peers this is no failure.
        if let Some(bfd) = self.bfd {
            bfd.stop().await;
        }
    }
}
