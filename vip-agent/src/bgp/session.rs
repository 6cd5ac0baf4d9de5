//! One BGP session per configured peer (RFC 4271 finite state machine), on tokio.
//!
//! Idle → Connect (TCP, with TCP-MD5 when configured) → OpenSent → OpenConfirm → Established.
//! Established: every route of the current announcement set, then End-of-RIB; afterwards only
//! the difference whenever the set changes; everything again on ROUTE-REFRESH; KEEPALIVE every
//! hold/3; NOTIFICATION and a reset on any error; Cease when told to stop. Lost sessions are
//! retried with exponential backoff (routers such as GoBGP refuse a reconnect for a while).
//! When the peer connects while we do, the connection of the speaker with the higher BGP
//! identifier stays (RFC 4271 6.8).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::{mpsc, watch},
    time::{Instant, sleep, sleep_until, timeout, timeout_at},
};

use super::wire::{self, Message, Notification, OpenParams, PathAttrs, code};
use crate::{bfd, config::BgpPeerConfig as Peer};

/// This speaker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub hold_time: u16,
    /// Graceful restart as a restarting speaker: restart time (seconds).
    pub graceful_restart: Option<u16>,
    /// Set the restart bit: this agent took over a running datapath.
    pub restarted: bool,
    /// Next hops; default: the session's own local address for its family.
    pub next_hop_v4: Option<Ipv4Addr>,
    pub next_hop_v6: Option<Ipv6Addr>,
}

/// What a session runs with: this speaker and the peer (its communities already include the
/// node-wide ones).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub local: Local,
    pub peer: Peer,
}

impl Settings {
    /// Whether `other` differs from these only in what routes carry (communities, MED,
    /// LOCAL_PREF, next hops): a re-announcement, not a new session.
    fn same_session(&self, other: &Settings) -> bool {
        let bare = |s: &Settings| {
            let mut s = s.clone();
            s.local.next_hop_v4 = None;
            s.local.next_hop_v6 = None;
            s.peer.communities.clear();
            s.peer.large_communities.clear();
            s.peer.med = None;
            s.peer.local_pref = None;
            s
        };
        bare(self) == bare(other)
    }
}

/// One announced VIP with its own attributes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub prefix: IpAddr,
    pub communities: Vec<u32>,
    pub large_communities: Vec<[u32; 3]>,
    pub med: Option<u32>,
}

/// RFC 1997 well-known communities and RFC 8326's GRACEFUL_SHUTDOWN.
pub const GRACEFUL_SHUTDOWN: u32 = 0xffff_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum State {
    #[default]
    Idle,
    Connect,
    OpenSent,
    OpenConfirm,
    Established,
}

/// What `status` and the metrics show about a session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub last_error: Option<String>,
    pub established_transitions: u64,
    /// Times an established session went down (not counting a stop).
    pub flaps: u64,
    pub announced: usize,
    /// UPDATE and NOTIFICATION messages, over every connection of the session.
    pub messages: MessageCounts,
    /// VIPs to announce that this session cannot carry (family not negotiated, or no next
    /// hop of their family); not counted in `announced`.
    pub unsendable: Vec<IpAddr>,
}

/// Messages of a session, by kind and direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageCounts {
    pub updates_sent: u64,
    pub updates_received: u64,
    pub notifications_sent: u64,
    pub notifications_received: u64,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connecting")]
    Connect(#[source] std::io::Error),
    #[error("connection")]
    Io(#[from] std::io::Error),
    #[error("we sent NOTIFICATION {0}")]
    Sent(Notification),
    #[error("peer sent NOTIFICATION {0}")]
    Received(Notification),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("BFD session down")]
    BfdDown,
    #[error("the session's settings changed (reload)")]
    Reconfigured,
}

enum End {
    Shutdown,
}

/// How a session ends when the speaker stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The peer left the config (a reload): withdraw, then Cease / Peer De-configured.
    Deconfigured,
    /// The node stops serving: Cease / Administrative Shutdown (the peer drops the routes),
    /// wrapped in Cease / Hard Reset where the N bit makes any other NOTIFICATION a graceful
    /// restart (RFC 8538).
    Withdraw,
    /// The agent restarts while the pinned datapath forwards: a peer that negotiated graceful
    /// restart keeps the routes, stale, until the new agent is back. The session ends with
    /// Cease / Administrative Reset where both sides set the N bit (RFC 8538), so the peer
    /// learns why; otherwise the connection closes without a NOTIFICATION (RFC 4724 4.2).
    Restart,
}

/// Runs the session with its peer until `shutdown` says how to stop, following `settings`.
/// With `bfd`, the session starts only while that BFD session is Up and ends the moment it
/// leaves Up.
pub async fn run(
    mut settings: watch::Receiver<Settings>,
    mut routes: watch::Receiver<Vec<Route>>,
    status: watch::Sender<Status>,
    mut shutdown: watch::Receiver<Option<Stop>>,
    mut inbound: mpsc::Receiver<TcpStream>,
    mut bfd: Option<watch::Receiver<bfd::Status>>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if shutdown.borrow().is_some() {
            return;
        }
        if let Some(bfd) = &mut bfd
            && !bfd_up(bfd, &mut shutdown, &mut inbound).await
        {
            return;
        }
        status.send_modify(|s| s.state = State::Connect);
        let before = status.borrow().established_transitions;
        let peer = settings.borrow_and_update().peer.address;
        let attempt = session(
            &mut settings,
            &mut routes,
            &status,
            &mut shutdown,
            &mut inbound,
        );
        let result = match &mut bfd {
            None => attempt.await,
            Some(bfd) => tokio::select! {
                result = attempt => result,
                () = bfd_down(bfd) => Err(SessionError::BfdDown),
            },
        };
        status.send_modify(|s| {
            s.state = State::Idle;
            s.announced = 0;
            s.unsendable.clear();
        });
        if status.borrow().established_transitions > before && !matches!(result, Ok(End::Shutdown))
        {
            status.send_modify(|s| s.flaps += 1);
        }
        match result {
            Ok(End::Shutdown) => return,
            Err(SessionError::Reconfigured) => {
                tracing::info!(%peer, "BGP session restarts with its new settings");
                continue;
            }
            Err(e) => {
                let error = crate::errors::chain(&e);
                tracing::warn!(%peer, %error, "BGP session down");
                status.send_modify(|s| s.last_error = Some(error));
            }
        }
        if status.borrow().established_transitions > before {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = sleep(backoff) => {}
            _ = shutdown.changed() => {}
            // New settings (a password, a port): try them now.
            _ = settings.changed() => backoff = Duration::from_secs(1),
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Waits for the BFD session to be Up; false if told to stop first. Connections the peer
/// opens meanwhile are closed: the path is not proven yet.
async fn bfd_up(
    bfd: &mut watch::Receiver<bfd::Status>,
    shutdown: &mut watch::Receiver<Option<Stop>>,
    inbound: &mut mpsc::Receiver<TcpStream>,
) -> bool {
    loop {
        if bfd.borrow_and_update().state == bfd::packet::State::Up {
            return true;
        }
        tokio::select! {
            changed = bfd.changed() => if changed.is_err() { return false },
            _ = shutdown.changed() => if shutdown.borrow().is_some() { return false },
            Some(early) = inbound.recv() => drop(early),
        }
    }
}

/// Returns when the BFD session leaves Up (never, once BFD has stopped).
async fn bfd_down(bfd: &mut watch::Receiver<bfd::Status>) {
    if bfd
        .wait_for(|s| s.state != bfd::packet::State::Up)
        .await
        .is_err()
    {
        std::future::pending::<()>().await;
    }
}

async fn connect(peer: &Peer) -> Result<TcpStream, SessionError> {
    let addr = SocketAddr::new(peer.address, peer.port);
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(SessionError::Connect)?;
    if let Some(key) = &peer.password {
        set_md5(&socket, addr, key).map_err(SessionError::Connect)?;
    }
    match timeout(Duration::from_secs(5), socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(SessionError::Connect(e)),
        Err(_) => Err(SessionError::ConnectTimeout),
    }
}

/// `struct tcp_md5sig` from linux/tcp.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: i32,
    key: [u8; 80],
}

/// Signs every segment to `peer` with `key` (RFC 2385). On an IPv6 socket an IPv4 peer is given
/// as its v4-mapped address.
pub fn set_md5(
    socket: &impl std::os::fd::AsRawFd,
    peer: SocketAddr,
    key: &str,
) -> std::io::Result<()> {
    if key.len() > 80 {
        return Err(std::io::Error::other("TCP MD5 keys are at most 80 bytes"));
    }
    // SAFETY: an all-zero tcp_md5sig is valid; we fill the address of the right family.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin =
                unsafe { &mut *std::ptr::from_mut(&mut sig.addr).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &mut *std::ptr::from_mut(&mut sig.addr).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_addr.s6_addr = a.ip().octets();
        }
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key.as_bytes());
    crate::net::sockopt::set(socket, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig)
}

/// A session's TCP connection. Messages are read through a buffer, so a read interrupted by
/// another event (a timer, a route change, a colliding connection) loses no bytes.
struct Connection {
    stream: TcpStream,
    received: Vec<u8>,
    /// We opened it; otherwise we accepted the peer's.
    ours: bool,
    /// Where its messages are counted.
    status: watch::Sender<Status>,
}

impl Connection {
    fn new(stream: TcpStream, ours: bool, status: &watch::Sender<Status>) -> Self {
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            received: Vec::with_capacity(wire::MAX_MESSAGE_LEN),
            ours,
            status: status.clone(),
        }
    }

    fn count(&self, kind: u8, sent: bool) {
        self.status.send_modify(|s| {
            let m = &mut s.messages;
            match (kind, sent) {
                (wire::UPDATE, true) => m.updates_sent += 1,
                (wire::UPDATE, false) => m.updates_received += 1,
                (wire::NOTIFICATION, true) => m.notifications_sent += 1,
                (wire::NOTIFICATION, false) => m.notifications_received += 1,
                _ => {}
            }
        });
    }

    /// The next message; a malformed one is answered with its NOTIFICATION. Cancel-safe.
    async fn read(&mut self) -> Result<Message, SessionError> {
        loop {
            if let Some(header) = self.received.first_chunk::<{ wire::HEADER_LEN }>() {
                let (kind, len) = match wire::parse_header(header) {
                    Ok(h) => h,
                    Err(n) => return Err(self.notify(n).await),
                };
                let end = wire::HEADER_LEN + len;
                if self.received.len() >= end {
                    let decoded = wire::decode_body(kind, &self.received[wire::HEADER_LEN..end]);
                    self.received.drain(..end);
                    self.count(kind, false);
                    return match decoded {
                        Ok(Message::Notification(n)) => Err(SessionError::Received(n)),
                        Ok(m) => Ok(m),
                        Err(n) => Err(self.notify(n).await),
                    };
                }
            }
            if self.stream.read_buf(&mut self.received).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
    }

    async fn send(&mut self, message: &[u8]) -> Result<(), SessionError> {
        self.stream.write_all(message).await?;
        if let Some(kind) = message.get(wire::HEADER_LEN - 1) {
            self.count(*kind, true);
        }
        Ok(())
    }

    /// Sends a NOTIFICATION; the session then ends.
    async fn notify(&mut self, n: Notification) -> SessionError {
        self.count(wire::NOTIFICATION, true);
        let _ = self.stream.write_all(&wire::encode_notification(&n)).await;
        let _ = self.stream.shutdown().await;
        SessionError::Sent(n)
    }
}

/// The session's TCP connection: connected to the peer, or accepted from it (passive peers only
/// accept). `None`: told to stop while waiting.
async fn transport(
    peer: &Peer,
    status: &watch::Sender<Status>,
    shutdown: &mut watch::Receiver<Option<Stop>>,
    inbound: &mut mpsc::Receiver<TcpStream>,
) -> Result<Option<Connection>, SessionError> {
    tokio::select! {
        // `None` (no listener) disables this branch rather than ending.
        Some(accepted) = inbound.recv() => Ok(Some(Connection::new(accepted, false, status))),
        connected = connect(peer), if !peer.passive => {
            Ok(Some(Connection::new(connected?, true, status)))
        }
        _ = shutdown.changed() => Ok(None),
    }
}

/// How an OPEN exchange ended.
enum Handshake {
    /// Both OPENs accepted and confirmed, with this hold time; the peer's OPEN.
    Established(u16, wire::Open),
    /// The peer's connection collided with ours and wins: continue on it.
    Yield(TcpStream),
}

fn collision() -> Notification {
    Notification::new(code::CEASE, code::CONNECTION_COLLISION, &[])
}

/// OpenSent and OpenConfirm on `conn`. A connection the peer opens meanwhile is a collision
/// (RFC 4271 6.8): the connection opened by the speaker with the higher BGP identifier stays,
/// the other is closed with Cease / connection collision.
async fn handshake(
    local: &Local,
    peer: &Peer,
    conn: &mut Connection,
    status: &watch::Sender<Status>,
    inbound: &mut mpsc::Receiver<TcpStream>,
) -> Result<Handshake, SessionError> {
    let our_hold = peer.hold_time.unwrap_or(local.hold_time);
    conn.send(&wire::encode_open(&OpenParams {
        asn: local.asn,
        hold_time: our_hold,
        router_id: local.router_id,
        graceful_restart: local.graceful_restart.map(|t| (t, local.restarted)),
    }))
    .await?;
    status.send_modify(|s| s.state = State::OpenSent);
    // RFC 4271 suggests a large hold time until the OPEN arrives; a router sends its OPEN at
    // once, and a silent connection must not hold the session longer than a hold time (at least
    // 10 s). A colliding connection waits in `inbound` until then: the comparison needs the
    // peer's identifier.
    let open_wait = Duration::from_secs(u64::from(our_hold).clamp(10, 240));
    let open = match timeout(open_wait, conn.read()).await {
        Err(_) => {
            return Err(conn
                .notify(Notification::new(code::HOLD_TIMER_EXPIRED, 0, &[]))
                .await);
        }
        Ok(Ok(Message::Open(open))) => open,
        Ok(Ok(_)) => return Err(conn.notify(Notification::new(code::FSM, 1, &[])).await),
        Ok(Err(e)) => return Err(e),
    };
    let bad_identifier = || Notification::new(code::OPEN_MESSAGE, code::BAD_BGP_IDENTIFIER, &[]);
    if peer.router_id.is_some_and(|id| id != open.router_id) {
        return Err(conn.notify(bad_identifier()).await);
    }
    if open.asn != peer.asn {
        let data = (open.asn as u16).to_be_bytes();
        return Err(conn
            .notify(Notification::new(
                code::OPEN_MESSAGE,
                code::BAD_PEER_AS,
                &data,
            ))
            .await);
    }
    if open.router_id == local.router_id && peer.asn == local.asn {
        return Err(conn.notify(bad_identifier()).await);
    }
    let hold = our_hold.min(open.hold_time);
    conn.send(&wire::encode_keepalive()).await?;
    status.send_modify(|s| s.state = State::OpenConfirm);
    let wait = if hold > 0 { u64::from(hold) } else { 240 };
    let deadline = Instant::now() + Duration::from_secs(wait);
    let peer_wins = conn.ours && u32::from(local.router_id) < u32::from(open.router_id);
    loop {
        tokio::select! {
            biased;
            Some(mut theirs) = inbound.recv() => {
                if peer_wins {
                    tracing::info!(peer = %peer.address, "connection collision: continuing on the peer's connection");
                    let _ = conn.notify(collision()).await;
                    return Ok(Handshake::Yield(theirs));
                }
                tracing::info!(peer = %peer.address, "connection collision: keeping ours");
                let _ = theirs.write_all(&wire::encode_notification(&collision())).await;
            }
            message = timeout_at(deadline, conn.read()) => return match message {
                Err(_) => Err(conn.notify(Notification::new(code::HOLD_TIMER_EXPIRED, 0, &[])).await),
                Ok(Ok(Message::Keepalive)) => Ok(Handshake::Established(hold, open)),
                Ok(Ok(_)) => Err(conn.notify(Notification::new(code::FSM, 2, &[])).await),
                Ok(Err(e)) => Err(e),
            },
        }
    }
}

async fn session(
    settings: &mut watch::Receiver<Settings>,
    routes: &mut watch::Receiver<Vec<Route>>,
    status: &watch::Sender<Status>,
    shutdown: &mut watch::Receiver<Option<Stop>>,
    inbound: &mut mpsc::Receiver<TcpStream>,
) -> Result<End, SessionError> {
    let mut current = settings.borrow_and_update().clone();
    let (local, peer) = (&current.local.clone(), &current.peer.clone());
    let Some(mut conn) = transport(peer, status, shutdown, inbound).await? else {
        return Ok(End::Shutdown);
    };
    let (hold, open) = loop {
        match handshake(local, peer, &mut conn, status, inbound).await? {
            Handshake::Established(hold, open) => break (hold, open),
            Handshake::Yield(theirs) => conn = Connection::new(theirs, false, status),
        }
    };
    let hold_duration = (hold > 0).then(|| Duration::from_secs(u64::from(hold)));
    status.send_modify(|s| {
        s.state = State::Established;
        s.established_transitions += 1;
        s.last_error = None;
    });
    tracing::info!(peer = %peer.address, asn = peer.asn, hold, "BGP session established");

    // Accepted on the dual-stack listener, an IPv4 session's address is v4-mapped.
    let local_addr = conn.stream.local_addr()?.ip().to_canonical();
    let families = (open.ipv4_unicast, open.ipv6_unicast);
    let attrs_of = |s: &Settings| {
        let s = s.clone();
        move |r: &Route| path_attrs(&s, local_addr, families, r)
    };
    let mut attrs = attrs_of(&current);

    // Everything, then End-of-RIB.
    let mut announced: HashMap<IpAddr, Route> = HashMap::new();
    let initial = routes.borrow_and_update().clone();
    send_changes(&mut conn, &mut announced, &initial, &attrs).await?;
    for m in wire::encode_end_of_rib() {
        conn.send(&m).await?;
    }
    status.send_modify(|s| s.announced = announced.len());

    let keepalive_every = hold_duration.map(|h| h / 3);
    let mut next_keepalive = keepalive_every.map(|k| Instant::now() + k);
    let mut hold_deadline = hold_duration.map(|h| Instant::now() + h);
    let far = || Instant::now() + Duration::from_secs(3600);
    loop {
        tokio::select! {
            message = conn.read() => match message? {
                Message::Keepalive | Message::Update => {
                    hold_deadline = hold_duration.map(|h| Instant::now() + h);
                }
                Message::RouteRefresh { afi, safi } => {
                    hold_deadline = hold_duration.map(|h| Instant::now() + h);
                    // For a family never negotiated: ignored (RFC 2918 section 4).
                    if !open.negotiated(afi, safi) {
                        tracing::debug!(peer = %peer.address, afi, safi, "ROUTE-REFRESH for a family not negotiated: ignored");
                        continue;
                    }
                    let all = routes.borrow().clone();
                    announced.clear();
                    send_changes(&mut conn, &mut announced, &all, &attrs).await?;
                }
                Message::Open(_) | Message::Notification(_) => {
                    return Err(conn.notify(Notification::new(code::FSM, 3, &[])).await);
                }
            },
            _ = sleep_until(hold_deadline.unwrap_or_else(far)), if hold_deadline.is_some() => {
                return Err(conn.notify(Notification::new(code::HOLD_TIMER_EXPIRED, 0, &[])).await);
            }
            _ = sleep_until(next_keepalive.unwrap_or_else(far)), if next_keepalive.is_some() => {
                conn.send(&wire::encode_keepalive()).await?;
                next_keepalive = keepalive_every.map(|k| Instant::now() + k);
            }
            // Collision with an established session: the new connection goes (RFC 4271 6.8).
            Some(mut late) = inbound.recv() => {
                let _ = late.write_all(&wire::encode_notification(&collision())).await;
            }
            changed = routes.changed() => {
                if changed.is_err() {
                    return Ok(End::Shutdown);
                }
                let wanted = routes.borrow_and_update().clone();
                send_changes(&mut conn, &mut announced, &wanted, &attrs).await?;
                status.send_modify(|s| s.announced = announced.len());
            }
            _ = settings.changed() => {
                let new = settings.borrow_and_update().clone();
                if !current.same_session(&new) {
                    let change = Notification::new(code::CEASE, code::OTHER_CONFIGURATION_CHANGE, &[]);
                    let _ = conn.notify(change).await;
                    return Err(SessionError::Reconfigured);
                }
                // New attributes: everything again.
                current = new;
                attrs = attrs_of(&current);
                let all = routes.borrow().clone();
                announced.clear();
                send_changes(&mut conn, &mut announced, &all, &attrs).await?;
                tracing::info!(peer = %peer.address, "routes re-announced with their new attributes");
            }
            _ = shutdown.changed() => {
                let stop = *shutdown.borrow();
                // With graceful restart and the N bit on both sides (RFC 8538), a peer keeps
                // the routes on any NOTIFICATION but Cease / Hard Reset.
                let notification_gr = local.graceful_restart.is_some() && open.graceful_notification;
                match stop {
                    Some(Stop::Withdraw) => {
                        let shutdown = [code::CEASE, code::ADMINISTRATIVE_SHUTDOWN];
                        let cease = if notification_gr {
                            Notification::new(code::CEASE, code::HARD_RESET, &shutdown)
                        } else {
                            Notification::new(shutdown[0], shutdown[1], &[])
                        };
                        let _ = conn.notify(cease).await;
                        return Ok(End::Shutdown);
                    }
                    Some(Stop::Deconfigured) => {
                        send_changes(&mut conn, &mut announced, &[], &attrs).await?;
                        let gone = Notification::new(code::CEASE, code::PEER_DECONFIGURED, &[]);
                        let _ = conn.notify(gone).await;
                        return Ok(End::Shutdown);
                    }
                    Some(Stop::Restart) if notification_gr => {
                        let reset = Notification::new(code::CEASE, code::ADMINISTRATIVE_RESET, &[]);
                        let _ = conn.notify(reset).await;
                        return Ok(End::Shutdown);
                    }
                    Some(Stop::Restart) => {
                        let _ = conn.stream.shutdown().await;
                        return Ok(End::Shutdown);
                    }
                    None => {}
                }
            }
        }
    }
}

/// The attributes `route` carries to the peer of `s`, over a session from `local_addr` that
/// negotiated `families` (IPv4, IPv6 unicast); `None` when the session cannot carry it.
fn path_attrs(
    s: &Settings,
    local_addr: IpAddr,
    families: (bool, bool),
    r: &Route,
) -> Option<PathAttrs> {
    let (local, peer) = (&s.local, &s.peer);
    let ebgp = peer.asn != local.asn;
    let mut communities = peer.communities.clone();
    communities.extend(&r.communities);
    let mut large = peer.large_communities.clone();
    large.extend(&r.large_communities);
    let next_hop_v4 = local.next_hop_v4.or(match local_addr {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    });
    let next_hop_v6 = local.next_hop_v6.or(match local_addr {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    });
    let carried = match r.prefix {
        IpAddr::V4(_) => families.0 && next_hop_v4.is_some(),
        IpAddr::V6(_) => families.1 && next_hop_v6.is_some(),
    };
    carried.then_some(PathAttrs {
        as_path: ebgp.then_some(local.asn),
        next_hop_v4,
        next_hop_v6,
        med: r.med.or(peer.med),
        local_pref: if ebgp {
            None
        } else {
            peer.local_pref.or(Some(100))
        },
        communities,
        large_communities: large,
    })
}

/// Withdraws what is no longer wanted and announces what is new or changed, grouping routes
/// with the same attributes into one UPDATE.
async fn send_changes(
    conn: &mut Connection,
    announced: &mut HashMap<IpAddr, Route>,
    wanted: &[Route],
    attrs: &impl Fn(&Route) -> Option<PathAttrs>,
) -> Result<(), SessionError> {
    // What this session can carry: a route of a family the peer did not negotiate, or without
    // a next hop of its family, stays out (and out of the count), and `status` says so.
    let (sendable, unsendable): (Vec<_>, Vec<_>) = wanted
        .iter()
        .map(|r| (r, attrs(r)))
        .partition(|(_, a)| a.is_some());
    let unsendable: Vec<IpAddr> = unsendable.iter().map(|(r, _)| r.prefix).collect();
    if conn.status.borrow().unsendable != unsendable {
        if !unsendable.is_empty() {
            tracing::warn!(
                ?unsendable,
                "VIPs this BGP session cannot carry (family not negotiated, or no next hop of their family: set bgp.next_hop_v4/v6)"
            );
        }
        conn.status
            .send_modify(|s| s.unsendable.clone_from(&unsendable));
    }
    let gone: Vec<IpAddr> = announced
        .keys()
        .filter(|p| !sendable.iter().any(|(r, _)| r.prefix == **p))
        .copied()
        .collect();
    for m in wire::encode_withdraw(&gone) {
        conn.send(&m).await?;
    }
    for p in &gone {
        announced.remove(p);
    }
    let mut groups: BTreeMap<Vec<u8>, (PathAttrs, Vec<IpAddr>)> = BTreeMap::new();
    for (r, a) in sendable {
        let Some(a) = a else { continue };
        if announced.get(&r.prefix) == Some(r) {
            continue;
        }
        let key = format!("{a:?}").into_bytes();
        groups
            .entry(key)
            .or_insert_with(|| (a, Vec::new()))
            .1
            .push(r.prefix);
        announced.insert(r.prefix, r.clone());
    }
    for (a, prefixes) in groups.into_values() {
        for m in wire::encode_announce(&prefixes, &a) {
            conn.send(&m).await?;
        }
    }
    Ok(())
}
