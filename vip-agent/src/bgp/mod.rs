//! vip's BGP speaker: announces VIPs (host routes, next hop self) to routers, never installs
//! what it receives.
//!
//! A VIP is announced while this node can forward it: the speaker starts after the XDP program
//! is attached, and only VIPs with a backend that takes new flows are in the announcement set.

pub mod session;
pub mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};

use vip_common::VipKey;

use crate::{
    bfd::{self, Bfd},
    config::{BgpConfig, BgpPeerConfig, Config},
};
use session::{GRACEFUL_SHUTDOWN, Local, Route, Settings, Status, Stop};

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

/// What readers see of the sessions.
#[derive(Debug, Default)]
struct Views {
    bgp: Vec<(IpAddr, watch::Receiver<Status>)>,
    bfd: Vec<(IpAddr, watch::Receiver<bfd::Status>)>,
    bfd_refusals: Option<Arc<bfd::Refusals>>,
}

/// A handle on the sessions' states, for readers that must not wait for the runtime; it
/// follows peers that a reload adds or removes.
#[derive(Clone, Debug, Default)]
pub struct Sessions(Arc<RwLock<Views>>);

impl Sessions {
    /// Session states by peer.
    pub fn status(&self) -> Vec<(IpAddr, Status)> {
        self.0.read().map_or_else(
            |_| Vec::new(),
            |v| {
                v.bgp
                    .iter()
                    .map(|(a, s)| (*a, s.borrow().clone()))
                    .collect()
            },
        )
    }

    /// BFD session states by peer (peers with BFD on).
    pub fn bfd(&self) -> Vec<(IpAddr, bfd::Status)> {
        self.0.read().map_or_else(
            |_| Vec::new(),
            |v| v.bfd.iter().map(|(a, s)| (*a, *s.borrow())).collect(),
        )
    }

    /// Received BFD packets refused, by reason; `None` without BFD.
    pub fn bfd_refusals(&self) -> Option<Vec<(&'static str, u64)>> {
        self.0
            .read()
            .ok()?
            .bfd_refusals
            .as_ref()
            .map(|r| r.counts())
    }
}

/// One configured peer's session.
struct PeerSession {
    settings: watch::Sender<Settings>,
    stop: watch::Sender<Option<Stop>>,
    status: watch::Receiver<Status>,
    task: JoinHandle<()>,
}

/// The running sessions. Each peer's session runs on its own: a reload that adds, removes or
/// changes a peer touches that peer's session only, and attribute changes (communities, MED,
/// next hops) are re-announced without a reset.
pub struct Speaker {
    routes: watch::Sender<Vec<Route>>,
    peers: BTreeMap<IpAddr, PeerSession>,
    listener: Option<Listener>,
    bfd: Option<Bfd>,
    /// BFD's socket, bound before the node was touched, until BFD starts with it.
    bfd_listener: Option<bfd::Listener>,
    settings: BgpConfig,
    /// This agent took over a running datapath (the graceful-restart restart bit).
    restarted: bool,
    views: Sessions,
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

/// Where accepted connections go: each configured peer's session, by address.
type Inbound = Arc<Mutex<HashMap<IpAddr, mpsc::Sender<TcpStream>>>>;

/// The port-179 listener (`listen`, or some peer is passive).
struct Listener {
    socket: Arc<TcpListener>,
    inbound: Inbound,
    task: JoinHandle<()>,
}

impl Listener {
    /// Accepts BGP connections and hands each to the session of the peer it comes from;
    /// connections from unconfigured addresses get Cease / connection rejected.
    fn start(inbound: Inbound) -> std::io::Result<Self> {
        let socket = TcpSocket::new_v6()?;
        socket.set_reuseaddr(true)?;
        // Dual-stack: IPv4 peers arrive as v4-mapped addresses.
        socket.bind(SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            BGP_PORT,
        )))?;
        // A flood of connections waits in the kernel's queue, not in SYN retries.
        let socket = Arc::new(socket.listen(LISTEN_BACKLOG)?);
        let refusal = wire::encode_notification(&wire::Notification::new(
            wire::code::CEASE,
            wire::code::CONNECTION_REJECTED,
            &[],
        ));
        let (accepting, peers) = (socket.clone(), inbound.clone());
        let task = tokio::spawn(async move {
            let mut refused = RefusalLog::default();
            while let Ok((stream, from)) = accepting.accept().await {
                let from = from.ip().to_canonical();
                let session = peers.lock().ok().and_then(|p| p.get(&from).cloned());
                match session {
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
        });
        Ok(Self {
            socket,
            inbound,
            task,
        })
    }

    /// Signs the segments of `peer`'s connections with its TCP-MD5 key.
    fn set_md5(&self, peer: IpAddr, key: &str) -> std::io::Result<()> {
        let mapped = match peer {
            IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
            v6 => v6,
        };
        session::set_md5(&*self.socket, SocketAddr::new(mapped, 0), key)
    }
}

/// A session's settings from the node's and the peer's config: node-wide communities first,
/// then the peer's own.
fn settings_for(config: &BgpConfig, peer: &BgpPeerConfig, restarted: bool) -> Settings {
    let mut peer = peer.clone();
    peer.communities = [&config.communities[..], &peer.communities[..]].concat();
    peer.large_communities = [&config.large_communities[..], &peer.large_communities[..]].concat();
    Settings {
        local: Local {
            asn: config.asn,
            router_id: config.router_id,
            hold_time: config.hold_time,
            graceful_restart: config.graceful_restart_time,
            restarted,
            next_hop_v4: config.next_hop_v4,
            next_hop_v6: config.next_hop_v6,
        },
        peer,
    }
}

impl Speaker {
    /// Starts one session per peer, and a BFD session for each peer that has it.
    /// `restarted`: this agent took over a running datapath (sets the graceful-restart
    /// restart bit).
    /// `bfd_listener`: BFD's socket, when the caller bound it early.
    pub fn start(
        settings: &BgpConfig,
        routes: Vec<Route>,
        restarted: bool,
        bfd_listener: Option<bfd::Listener>,
    ) -> Result<Self, bfd::BfdError> {
        let (routes, _) = watch::channel(routes);
        let mut speaker = Self {
            routes,
            peers: BTreeMap::new(),
            listener: None,
            bfd: None,
            bfd_listener,
            settings: settings.clone(),
            restarted,
            views: Sessions::default(),
        };
        // Listening before any session connects: a peer that answers our connection with its
        // own (a collision) must find the port open.
        speaker.listen();
        for peer in &settings.peers {
            speaker.add_peer(peer)?;
        }
        speaker.publish();
        Ok(speaker)
    }

    /// Starts or stops the listener as the settings ask, keys included.
    fn listen(&mut self) {
        if !self.settings.listen {
            if let Some(l) = self.listener.take() {
                l.task.abort();
            }
            return;
        }
        if self.listener.is_none() {
            let inbound = Inbound::default();
            match Listener::start(inbound) {
                Ok(l) => self.listener = Some(l),
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen on BGP port {BGP_PORT}: peers cannot connect to us");
                    return;
                }
            }
        }
        if let Some(l) = &self.listener {
            for p in &self.settings.peers {
                if let Some(key) = &p.password
                    && let Err(e) = l.set_md5(p.address, key)
                {
                    tracing::error!(peer = %p.address, error = %e, "TCP-MD5 key on the listener");
                }
            }
        }
    }

    fn add_peer(&mut self, peer: &BgpPeerConfig) -> Result<(), bfd::BfdError> {
        let bfd = if peer.bfd {
            let bfd = match &mut self.bfd {
                Some(b) => b,
                None => self.bfd.insert(Bfd::start(
                    self.settings.bfd_timers,
                    self.bfd_listener.take(),
                )?),
            };
            Some(bfd.add(peer.address)?)
        } else {
            None
        };
        let (inbound_tx, inbound_rx) = mpsc::channel(4);
        if let Some(l) = &self.listener
            && let Ok(mut map) = l.inbound.lock()
        {
            map.insert(peer.address, inbound_tx);
        }
        let (settings, settings_rx) =
            watch::channel(settings_for(&self.settings, peer, self.restarted));
        let (stop, stop_rx) = watch::channel(None);
        let (status_tx, status) = watch::channel(Status::default());
        let task = tokio::spawn(session::run(
            settings_rx,
            self.routes.subscribe(),
            status_tx,
            stop_rx,
            inbound_rx,
            bfd,
        ));
        self.peers.insert(
            peer.address,
            PeerSession {
                settings,
                stop,
                status,
                task,
            },
        );
        Ok(())
    }

    /// Ends a removed peer's session: its routes withdrawn, Cease / peer de-configured.
    async fn remove_peer(&mut self, peer: IpAddr) {
        let Some(session) = self.peers.remove(&peer) else {
            return;
        };
        if let Some(l) = &self.listener
            && let Ok(mut map) = l.inbound.lock()
        {
            map.remove(&peer);
        }
        session.stop.send_replace(Some(Stop::Deconfigured));
        let _ = tokio::time::timeout(Duration::from_secs(2), session.task).await;
        if let Some(bfd) = &mut self.bfd {
            bfd.remove(peer);
        }
    }

    /// Applies new settings (a reload): removed peers' sessions end, new ones start, a peer
    /// whose BFD was switched is started again, and every other session gets its new settings
    /// (and decides whether they need a reset or a re-announcement).
    pub async fn reconfigure(&mut self, new: &BgpConfig) -> Result<(), bfd::BfdError> {
        let old = std::mem::replace(&mut self.settings, new.clone());
        let before: HashMap<IpAddr, &BgpPeerConfig> =
            old.peers.iter().map(|p| (p.address, p)).collect();
        let switched = |p: &BgpPeerConfig| before.get(&p.address).is_some_and(|o| o.bfd != p.bfd);
        let gone: Vec<IpAddr> = old
            .peers
            .iter()
            .map(|p| p.address)
            .filter(|a| !new.peers.iter().any(|p| p.address == *a))
            .chain(new.peers.iter().filter(|p| switched(p)).map(|p| p.address))
            .collect();
        for peer in gone {
            tracing::info!(%peer, "BGP peer removed from the config");
            self.remove_peer(peer).await;
        }
        self.listen();
        if let Some(bfd) = &self.bfd {
            bfd.set_timers(new.bfd_timers);
        }
        for peer in &new.peers {
            match self.peers.get(&peer.address) {
                Some(session) => {
                    let settings = settings_for(new, peer, self.restarted);
                    session.settings.send_if_modified(|s| {
                        let changed = *s != settings;
                        *s = settings;
                        changed
                    });
                }
                None => {
                    tracing::info!(peer = %peer.address, "BGP peer added");
                    self.add_peer(peer)?;
                }
            }
        }
        self.publish();
        Ok(())
    }

    /// Replaces the announcement set; sessions send the difference.
    pub fn announce(&self, routes: Vec<Route>) {
        self.routes.send_replace(routes);
    }

    /// The sessions' states.
    pub fn sessions(&self) -> Sessions {
        self.views.clone()
    }

    /// Shows readers the sessions there are now.
    fn publish(&self) {
        if let Ok(mut v) = self.views.0.write() {
            *v = Views {
                bgp: self
                    .peers
                    .iter()
                    .map(|(a, s)| (*a, s.status.clone()))
                    .collect(),
                bfd: self.bfd.as_ref().map(Bfd::sessions).unwrap_or_default(),
                bfd_refusals: self.bfd.as_ref().map(Bfd::refusals),
            };
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
            let done = self.peers.values().all(|p| {
                let s = p.status.borrow();
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
        for p in self.peers.values() {
            p.stop.send_replace(Some(stop));
        }
        if let Some(listener) = self.listener {
            listener.task.abort();
        }
        for p in self.peers.into_values() {
            let _ = tokio::time::timeout(Duration::from_secs(2), p.task).await;
        }
        // After the sessions' last words: BFD's AdminDown tells the peers this is no failure.
        if let Some(bfd) = self.bfd {
            bfd.stop().await;
        }
    }
}
