//! BFD toward the BGP peers that ask for it (RFC 5880 asynchronous mode, single hop as RFC 5881
//! says): a dead LB node is noticed by its router in the detection time (300 ms at 100 ms x 3)
//! instead of the BGP hold time, and a dead router takes its BGP session down here just as fast.
//!
//! One task runs every session: it receives on UDP port 3784 (one dual-stack socket; only
//! packets with TTL / hop limit 255 count, so nothing off-link can reach a session), sends
//! from one source port per session in 49152..=65535 with TTL 255, and runs the timers. The
//! state machines are pure ([`session`]); the BGP sessions follow each BFD session's state
//! through a watch channel.

pub mod packet;
pub mod session;

use std::{
    collections::hash_map::RandomState,
    hash::BuildHasher,
    net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::Interest,
    net::UdpSocket,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, sleep_until},
};

use session::Session;
pub use session::{Status, Timers};

/// Where BFD Control packets for single-hop sessions arrive (RFC 5881 section 4).
pub const PORT: u16 = 3784;

/// The only TTL / hop limit a single-hop session accepts, and the one it sends.
const TTL: u8 = 255;

/// Why received packets were refused, counted by reason for the metrics.
#[derive(Debug, Default)]
pub struct Refusals {
    counts: [AtomicU64; Refusals::REASONS.len()],
}

impl Refusals {
    /// The reasons, as metrics labels: the decoder's ([`packet::PacketError::label`]), a TTL
    /// other than 255, and a packet that belongs to no session of ours.
    pub const REASONS: [&'static str; 6] = [
        "length",
        "version",
        "authentication",
        "malformed",
        "ttl",
        "unknown_session",
    ];

    fn count(&self, reason: &'static str) {
        if let Some(i) = Self::REASONS.iter().position(|r| *r == reason) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Each reason with its count.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        Self::REASONS
            .iter()
            .zip(&self.counts)
            .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Why BFD could not start.
#[derive(Debug, thiserror::Error)]
pub enum BfdError {
    #[error("listening on UDP port {PORT}")]
    Listen(#[source] std::io::Error),
    #[error("opening the socket that sends to {0}")]
    Sender(IpAddr, #[source] std::io::Error),
}

/// The running sessions.
pub struct Bfd {
    sessions: Vec<(IpAddr, watch::Receiver<Status>)>,
    /// Every local discriminator given out, so none is given twice.
    discriminators: Vec<u32>,
    random: RandomState,
    timers: watch::Sender<Timers>,
    changes: mpsc::UnboundedSender<Change>,
    stop: watch::Sender<bool>,
    refusals: Arc<Refusals>,
    task: JoinHandle<()>,
}

/// A session joining or leaving the running task.
enum Change {
    Add(Box<Running>),
    Remove(IpAddr),
}

/// A session with its sending socket and schedule.
struct Running {
    peer: IpAddr,
    fsm: Session,
    socket: UdpSocket,
    next_tx: Instant,
    status: watch::Sender<Status>,
}

impl Bfd {
    /// Receives on `listener` (bound now when not given); sessions come with [`Bfd::add`],
    /// all with `timers`.
    pub fn start(timers: Timers, listener: Option<Listener>) -> Result<Self, BfdError> {
        let receiver = match listener {
            Some(l) => l.0,
            None => Listener::bind()?.0,
        };
        let (timers_tx, timers_rx) = watch::channel(timers);
        let (changes, changes_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let refusals = Arc::new(Refusals::default());
        let task = tokio::spawn(run(
            receiver,
            changes_rx,
            timers_rx,
            stop_rx,
            refusals.clone(),
        ));
        Ok(Self {
            sessions: Vec::new(),
            discriminators: Vec::new(),
            random: RandomState::new(),
            timers: timers_tx,
            changes,
            stop: stop_tx,
            refusals,
            task,
        })
    }

    /// A session with `peer`, starting in Down.
    pub fn add(&mut self, peer: IpAddr) -> Result<watch::Receiver<Status>, BfdError> {
        // Non-zero, unique on the node and unpredictable, so that a stale packet of an
        // earlier session matches no session of this one.
        let mut attempt = 0u64;
        let discriminator = loop {
            attempt += 1;
            let d = self.random.hash_one((peer, attempt)) as u32;
            if d != 0 && !self.discriminators.contains(&d) {
                break d;
            }
        };
        self.discriminators.push(discriminator);
        let fsm = Session::new(discriminator, *self.timers.borrow());
        let (status, view) = watch::channel(fsm.status());
        let running = Running {
            peer,
            socket: sender(peer, &self.random).map_err(|e| BfdError::Sender(peer, e))?,
            fsm,
            next_tx: Instant::now(),
            status,
        };
        // The task ends only with `stop`, which takes `self`.
        let _ = self.changes.send(Change::Add(Box::new(running)));
        self.sessions.push((peer, view.clone()));
        Ok(view)
    }

    /// Ends the session with `peer` (AdminDown to it first).
    pub fn remove(&mut self, peer: IpAddr) {
        self.sessions.retain(|(p, _)| *p != peer);
        let _ = self.changes.send(Change::Remove(peer));
    }

    /// Every session's state, by peer.
    pub fn sessions(&self) -> Vec<(IpAddr, watch::Receiver<Status>)> {
        self.sessions.clone()
    }

    pub fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    /// New timers (a reload): sessions that are Up change them through a Poll Sequence.
    pub fn set_timers(&self, timers: Timers) {
        self.timers.send_if_modified(|t| {
            let changed = *t != timers;
            *t = timers;
            changed
        });
    }

    /// Tells every peer AdminDown (not a failure, RFC 5882 section 3.2) and ends.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.task).await;
    }
}

/// BFD's receiving socket, bound: dual-stack, port 3784, with each packet's TTL / hop limit.
/// The agent binds it before it changes anything on the node, so a port another BFD daemon
/// holds fails start-up cleanly.
pub struct Listener(UdpSocket);

impl Listener {
    pub fn bind() -> Result<Self, BfdError> {
        let bind = || -> std::io::Result<UdpSocket> {
            let socket = StdUdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT)))?;
            let on: libc::c_int = 1;
            crate::net::sockopt::set(&socket, libc::IPPROTO_IP, libc::IP_RECVTTL, &on)?;
            crate::net::sockopt::set(&socket, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, &on)?;
            socket.set_nonblocking(true)?;
            UdpSocket::from_std(socket)
        };
        bind().map(Self).map_err(BfdError::Listen)
    }
}

/// A session's sending socket: a source port of its own in 49152..=65535 (RFC 5881
/// section 4), TTL / hop limit 255, connected to the peer's port 3784.
fn sender(peer: IpAddr, random: &impl BuildHasher) -> std::io::Result<UdpSocket> {
    let unspecified = match peer {
        IpAddr::V4(_) => IpAddr::from([0, 0, 0, 0]),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let start = (random.hash_one(peer) % 16384) as u16;
    let mut last = None;
    for offset in 0..16384u16 {
        let port = 49152 + (start + offset) % 16384;
        match StdUdpSocket::bind(SocketAddr::new(unspecified, port)) {
            Ok(socket) => {
                let ttl = libc::c_int::from(TTL);
                match peer {
                    IpAddr::V4(_) => socket.set_ttl(u32::from(TTL))?,
                    IpAddr::V6(_) => crate::net::sockopt::set(
                        &socket,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_UNICAST_HOPS,
                        &ttl,
                    )?,
                }
                socket.connect(SocketAddr::new(peer, PORT))?;
                socket.set_nonblocking(true)?;
                return UdpSocket::from_std(socket);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free source port")))
}

/// One received datagram: its payload length, sender and TTL / hop limit (if the kernel said).
fn receive(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, IpAddr, Option<u8>)> {
    // SAFETY: recvmsg writes at most the lengths given into buffers that live for the call;
    // the control messages are read only within the length the kernel returned.
    unsafe {
        let mut from: libc::sockaddr_in6 = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 16];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = std::ptr::from_mut(&mut from).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in6>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ttl = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let is_ttl = (c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_TTL)
                || (c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_HOPLIMIT);
            if is_ttl {
                let value = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                ttl = u8::try_from(value).ok();
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        let address = IpAddr::V6(Ipv6Addr::from(from.sin6_addr.s6_addr)).to_canonical();
        Ok((n as usize, address, ttl))
    }
}

/// The session a valid packet belongs to (RFC 5880 section 6.8.6): by Your Discriminator, or,
/// while that is 0 (the peer has not heard from us), by the sender's address, and then only
/// in Down or AdminDown. Single hop: a session takes packets from its peer's address only.
fn demux(sessions: &[Running], c: &packet::Control, from: IpAddr) -> Option<usize> {
    let i = if c.your_discriminator != 0 {
        sessions
            .iter()
            .position(|s| s.fsm.local_discriminator() == c.your_discriminator)?
    } else if matches!(c.state, packet::State::Down | packet::State::AdminDown) {
        sessions.iter().position(|s| s.peer == from)?
    } else {
        return None;
    };
    (sessions[i].peer == from).then_some(i)
}

/// A number in 0..=1 for the transmit jitter.
fn jitter(random: &RandomState, seq: u64) -> f64 {
    (random.hash_one(seq) % 1001) as f64 / 1000.0
}

async fn run(
    receiver: UdpSocket,
    mut changes: mpsc::UnboundedReceiver<Change>,
    mut timers: watch::Receiver<Timers>,
    mut stop: watch::Receiver<bool>,
    refusals: Arc<Refusals>,
) {
    let random = RandomState::new();
    let mut sessions: Vec<Running> = Vec::new();
    let mut seq = 0u64;
    let mut buf = [0u8; 512];
    loop {
        let next = sessions
            .iter()
            .flat_map(|s| {
                [
                    Some(s.next_tx),
                    s.fsm.detection_deadline().map(Instant::from_std),
                ]
            })
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            ready = receiver.ready(Interest::READABLE) => {
                if ready.is_err() {
                    continue;
                }
                let received = receiver.try_io(Interest::READABLE, || {
                    receive(&receiver, &mut buf)
                });
                let Ok((len, from, ttl)) = received else { continue };
                if ttl != Some(TTL) {
                    refusals.count("ttl");
                    continue;
                }
                let control = match packet::decode(&buf[..len]) {
                    Ok(c) => c,
                    Err(e) => {
                        refusals.count(e.label());
                        continue;
                    }
                };
                let Some(i) = demux(&sessions, &control, from) else {
                    refusals.count("unknown_session");
                    continue;
                };
                let s = &mut sessions[i];
                let before = s.fsm.state();
                let reaction = s.fsm.receive(&control, std::time::Instant::now());
                if reaction.send_final {
                    send(s, true).await;
                }
                if reaction.changed {
                    log_change(s, before);
                    send(s, false).await;
                    seq += 1;
                    schedule(s, jitter(&random, seq));
                }
            }
            _ = sleep_until(next) => {
                let now = Instant::now();
                for s in &mut sessions {
                    let before = s.fsm.state();
                    if s.fsm.expire(now.into_std()) {
                        log_change(s, before);
                        send(s, false).await;
                    }
                    if s.next_tx <= now {
                        send(s, false).await;
                        seq += 1;
                        schedule(s, jitter(&random, seq));
                    }
                }
            }
            Some(change) = changes.recv() => match change {
                Change::Add(s) => sessions.push(*s),
                Change::Remove(peer) => {
                    if let Some(i) = sessions.iter().position(|s| s.peer == peer) {
                        let mut gone = sessions.swap_remove(i);
                        gone.fsm.admin_down();
                        send(&gone, false).await;
                    }
                }
            },
            changed = timers.changed() => {
                if changed.is_err() {
                    return;
                }
                let new = *timers.borrow_and_update();
                tracing::info!(min_tx = ?new.min_tx, min_rx = ?new.min_rx, multiplier = new.multiplier, "BFD timers changed");
                for s in &mut sessions {
                    s.fsm.set_timers(new);
                    send(s, false).await;
                }
            }
            _ = stop.changed() => {
                for s in &mut sessions {
                    s.fsm.admin_down();
                    send(s, false).await;
                }
                return;
            }
        }
        for s in &sessions {
            let now = s.fsm.status();
            s.status.send_if_modified(|old| {
                let changed = *old != now;
                *old = now;
                changed
            });
        }
    }
}

/// Sets the next periodic packet; without a rate (the peer asks for none) checks again in a
/// second.
fn schedule(s: &mut Running, random: f64) {
    s.next_tx = Instant::now()
        + s.fsm
            .next_tx_delay(random)
            .unwrap_or(Duration::from_secs(1));
}

async fn send(s: &Running, final_: bool) {
    if !final_ && s.fsm.tx_interval().is_none() {
        return;
    }
    let bytes = packet::encode(&s.fsm.packet(final_));
    // A peer that does not listen yet answers with ICMP unreachable, which a later send on
    // the connected socket reports: nothing to do but keep sending.
    if let Err(e) = s.socket.send(&bytes).await {
        tracing::trace!(peer = %s.peer, error = %e, "sending BFD");
    }
}

fn log_change(s: &Running, before: packet::State) {
    let now = s.fsm.status();
    if now.state == packet::State::Up {
        tracing::info!(peer = %s.peer, remote_discriminator = now.remote_discriminator, "BFD session up");
    } else if before == packet::State::Up {
        tracing::warn!(peer = %s.peer, diag = ?now.diag, "BFD session down");
    } else {
        tracing::debug!(peer = %s.peer, from = ?before, to = ?now.state, "BFD session state");
    }
}
