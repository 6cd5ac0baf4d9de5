//! Flow-state sharing between the LB nodes of a tier (`[sync]`).
//!
//! Every node computes the same Maglev answer for a flow, so only flows whose tracked backend
//! differs from that answer need sharing: the exceptions a backend change leaves behind. After
//! each change of its tables (and every `refresh`), the runtime scans its conntrack tables for
//! them ([`exceptions`]) and hands the set to this service, which pushes it to every peer over
//! a connection of its own ([`wire`]: both ends prove the shared key, every frame is
//! authenticated and numbered). What peers push arrives here and goes to the runtime, which
//! writes it into conntrack where this node has that backend for that VIP.
//!
//! Nothing here waits on a peer while forwarding: each peer has its own task and connection,
//! the datapath never sees this service, and a starting node waits for its peers' exceptions
//! only until `fetch_timeout`; its peers push to it at once however it went away (`link`).

pub mod exceptions;
mod link;
pub mod wire;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::config::SyncConfig;
use link::Link;
use wire::{Entry, HELLO_LEN, Key, Kind, NONCE_LEN, Refusal, Session};

/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A sender with nothing to say sends a keepalive this often...
const KEEPALIVE: Duration = Duration::from_secs(5);
/// ... and a receiver that hears nothing this long closes the connection.
const SILENCE: Duration = Duration::from_secs(20);
/// Between attempts to reach a peer.
const RECONNECT: Duration = Duration::from_secs(1);

/// What arrived from a peer, for the runtime.
#[derive(Debug)]
pub enum Received {
    Entries {
        from: IpAddr,
        entries: Vec<Entry>,
    },
    /// The peer has sent every exception it holds.
    Synced {
        from: IpAddr,
    },
}

/// One peer's side of the service, as status and metrics show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStats {
    /// This node's connection to the peer (pushing) is up.
    pub outbound_up: bool,
    /// The peer's connection to this node is up.
    pub inbound_up: bool,
    pub entries_sent: u64,
    pub entries_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// When the peer last finished sending everything it holds (seconds since the epoch).
    pub last_full_sync: Option<u64>,
    /// This node announced at its start before the peer had pushed everything it holds
    /// (`fetch_timeout` ran out): flows only the peer knew of met the Maglev answer here until
    /// its push landed.
    #[serde(default)]
    pub started_without_state: bool,
}

/// The service's counters: per peer, refusals by reason, and what the runtime applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub peers: Vec<(IpAddr, PeerStats)>,
    /// (reason label, count): frames and connections refused.
    pub refused: Vec<(String, u64)>,
    pub applied: u64,
    /// (reason label, count): entries not applied.
    pub rejected: Vec<(String, u64)>,
}

#[derive(Default)]
struct Shared {
    peers: HashMap<IpAddr, PeerStats>,
    refused: HashMap<Refusal, u64>,
    applied: u64,
    rejected: HashMap<&'static str, u64>,
}

/// The counters, shared by the service's tasks, the runtime and the readers.
#[derive(Clone, Default)]
pub struct Counters(Arc<Mutex<Shared>>);

impl Counters {
    fn peer(&self, peer: IpAddr, f: impl FnOnce(&mut PeerStats)) {
        if let Ok(mut s) = self.0.lock() {
            f(s.peers.entry(peer).or_default());
        }
    }

    fn refuse(&self, why: Refusal) {
        if let Ok(mut s) = self.0.lock() {
            *s.refused.entry(why).or_default() += 1;
        }
    }

    /// This node announced at its start without these peers' state.
    pub fn started_without(&self, peers: impl IntoIterator<Item = IpAddr>) {
        if let Ok(mut s) = self.0.lock() {
            for peer in peers {
                s.peers.entry(peer).or_default().started_without_state = true;
            }
        }
    }

    /// Counts what the runtime did with received entries.
    pub fn applied(&self, applied: u64, rejected: &[(&'static str, u64)]) {
        if let Ok(mut s) = self.0.lock() {
            s.applied += applied;
            for (reason, n) in rejected {
                *s.rejected.entry(reason).or_default() += n;
            }
        }
    }

    /// A copy for readers.
    pub fn snapshot(&self) -> Stats {
        let Ok(s) = self.0.lock() else {
            return Stats::default();
        };
        let mut peers: Vec<(IpAddr, PeerStats)> =
            s.peers.iter().map(|(a, p)| (*a, p.clone())).collect();
        peers.sort_by_key(|(a, _)| *a);
        Stats {
            peers,
            refused: Refusal::ALL
                .iter()
                .map(|r| (r.label().to_owned(), s.refused.get(r).copied().unwrap_or(0)))
                .collect(),
            applied: s.applied,
            rejected: exceptions::REJECTIONS
                .iter()
                .map(|r| ((*r).to_owned(), s.rejected.get(r).copied().unwrap_or(0)))
                .collect(),
        }
    }
}

/// The running service.
pub struct Sync {
    exceptions: watch::Sender<Arc<Vec<Entry>>>,
    pub counters: Counters,
    peers: Vec<IpAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Sync {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The service's listener, bound before the agent changes the node (a taken port fails
/// start-up with nothing changed).
pub struct Listener(TcpListener);

impl Listener {
    pub async fn bind(address: SocketAddr) -> std::io::Result<Self> {
        TcpListener::bind(address).await.map(Self)
    }
}

impl Sync {
    /// Starts accepting peers' pushes on `listener` and pushing to every peer; what peers
    /// send comes out of the receiver.
    pub fn start(config: &SyncConfig, listener: Listener) -> (Self, mpsc::Receiver<Received>) {
        let key = Key::new(&config.key);
        let counters = Counters::default();
        let (exceptions, exceptions_rx) = watch::channel(Arc::new(Vec::new()));
        let (received_tx, received) = mpsc::channel(64);
        let peers: Vec<IpAddr> = config.peers.iter().map(SocketAddr::ip).collect();
        let links: HashMap<IpAddr, Arc<Link>> = peers
            .iter()
            .map(|&peer| (peer, Arc::new(Link::new(peer, counters.clone()))))
            .collect();
        let mut tasks = Vec::new();
        for peer in &config.peers {
            tasks.push(tokio::spawn(push(
                *peer,
                key.clone(),
                exceptions_rx.clone(),
                counters.clone(),
                links[&peer.ip()].clone(),
            )));
        }
        tasks.push(tokio::spawn(accept(
            listener.0,
            Arc::new(links),
            key,
            config.max_entries_per_second,
            received_tx,
            counters.clone(),
        )));
        info!(listen = %config.listen, peers = ?config.peers, "flow-state sharing");
        let sync = Self {
            exceptions,
            counters,
            peers,
            tasks,
        };
        (sync, received)
    }

    /// The configured peers' addresses.
    pub fn peers(&self) -> &[IpAddr] {
        &self.peers
    }

    /// The exceptions this node holds now: pushed to every peer.
    pub fn publish(&self, entries: Vec<Entry>) {
        self.exceptions.send_replace(Arc::new(entries));
    }
}

/// Pushes this node's exceptions to `peer`: on every connection, all of them then `Synced`;
/// again whenever they change; keepalives in between. Reconnects until the service stops,
/// after `RECONNECT`, or at once when the peer has just connected to this node (see `link`).
async fn push(
    peer: SocketAddr,
    key: Key,
    mut exceptions: watch::Receiver<Arc<Vec<Entry>>>,
    counters: Counters,
    link: Arc<Link>,
) {
    loop {
        if let Err(e) = push_once(peer, &key, &mut exceptions, &counters, &link).await {
            debug!(%peer, error = %e, "flow-state push connection ended");
        }
        link.push_down();
        if link.peer_back() {
            info!(%peer, "the peer connected anew: pushing to it on a new connection");
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(RECONNECT) => {}
            () = link.peer_connected() => {}
        }
    }
}

async fn push_once(
    peer: SocketAddr,
    key: &Key,
    exceptions: &mut watch::Receiver<Arc<Vec<Entry>>>,
    counters: &Counters,
    link: &Link,
) -> std::io::Result<()> {
    // A peer that connects while this one waits on a connection it may never answer (its
    // SYNs lost while it was away): connect again at once.
    let stream = tokio::select! {
        stream = timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(peer)) => stream??,
        () = link.peer_connected() => return Err(std::io::Error::other("the peer connected anew")),
    };
    stream.set_nodelay(true)?;
    let (mut from_peer, mut to_peer) = stream.into_split();
    let nonce: [u8; NONCE_LEN] = rand_nonce();
    to_peer.write_all(&wire::connector_hello(&nonce)).await?;
    let mut hello = [0u8; HELLO_LEN];
    timeout(HANDSHAKE_TIMEOUT, from_peer.read_exact(&mut hello)).await??;
    let acceptor = wire::read_acceptor_hello(key, &nonce, &hello).map_err(|why| {
        counters.refuse(why);
        std::io::Error::other(why)
    })?;
    let mut session = Session::new(key.clone(), &nonce, &acceptor);
    link.push_up();
    info!(%peer, "pushing flow state to the peer");
    // The acceptor writes nothing after its HELLO: a read that returns means the connection
    // closed or was reset.
    let closed = async move {
        let mut byte = [0u8; 1];
        match from_peer.read(&mut byte).await {
            Ok(_) => std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
            Err(e) => e,
        }
    };
    tokio::pin!(closed);
    loop {
        let entries = exceptions.borrow_and_update().clone();
        let mut bytes = 0;
        for chunk in entries.chunks(wire::ENTRIES_PER_FRAME) {
            let mut payload = Vec::with_capacity(chunk.len() * wire::ENTRY_LEN);
            for e in chunk {
                e.encode(&mut payload);
            }
            let frame = session.seal(Kind::Entries, &payload);
            to_peer.write_all(&frame).await?;
            bytes += frame.len() as u64;
        }
        let frame = session.seal(Kind::Synced, &[]);
        to_peer.write_all(&frame).await?;
        bytes += frame.len() as u64;
        counters.peer(peer.ip(), |p| {
            p.entries_sent += entries.len() as u64;
            p.bytes_sent += bytes;
        });
        loop {
            tokio::select! {
                changed = timeout(KEEPALIVE, exceptions.changed()) => match changed {
                    Ok(Ok(())) => break,
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => {}
                },
                // The peer connected anew: if this connection is its previous life's, the
                // keepalive brings its reset back within a round trip (then `closed`).
                () = link.peer_connected() => {}
                e = &mut closed => return Err(e),
            }
            let frame = session.seal(Kind::Keepalive, &[]);
            to_peer.write_all(&frame).await?;
        }
    }
}

fn rand_nonce() -> [u8; NONCE_LEN] {
    use ring::rand::SecureRandom;
    let mut n = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut n)
        .expect("the system's random source");
    n
}

/// Accepts configured peers' pushes; anyone else is refused before a byte is read.
async fn accept(
    listener: TcpListener,
    links: Arc<HashMap<IpAddr, Arc<Link>>>,
    key: Key,
    max_entries_per_second: u32,
    received: mpsc::Sender<Received>,
    counters: Counters,
) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                warn!(error = %e, "flow-state listener");
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        };
        let from_ip = from.ip().to_canonical();
        let Some(link) = links.get(&from_ip).cloned() else {
            counters.refuse(Refusal::NotAPeer);
            warn!(%from, "flow-state connection from an address that is not a peer: refused");
            continue;
        };
        let (key, received, counters) = (key.clone(), received.clone(), counters.clone());
        tokio::spawn(async move {
            let result = receive(
                stream,
                &link,
                &key,
                max_entries_per_second,
                &received,
                &counters,
            )
            .await;
            if let Err(why) = result {
                debug!(peer = %from_ip, %why, "flow-state connection from the peer ended");
            }
        });
    }
}

/// Why a receiving connection ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("silent for {SILENCE:?}")]
    Silent,
    #[error("replaced by a newer connection from the peer")]
    Replaced,
    #[error("the runtime stopped")]
    Stopped,
}

/// Receives one connection's frames from `link`'s peer until it ends, is refused or replaced.
async fn receive(
    mut stream: TcpStream,
    link: &Link,
    key: &Key,
    max_entries_per_second: u32,
    received: &mpsc::Sender<Received>,
    counters: &Counters,
) -> Result<(), Ended> {
    let from = link.peer();
    let refuse = |why: Refusal| {
        counters.refuse(why);
        Ended::Refused(why)
    };
    let mut hello = [0u8; HELLO_LEN];
    timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut hello))
        .await
        .map_err(|_| Ended::Silent)??;
    let connector = wire::read_connector_hello(&hello).map_err(refuse)?;
    let acceptor = rand_nonce();
    stream
        .write_all(&wire::acceptor_hello(key, &connector, &acceptor))
        .await?;
    let mut session = Session::new(key.clone(), &connector, &acceptor);
    let mut budget = RateBudget::new(max_entries_per_second);
    // From the first frame that opens (the connector holds the key): the connection that counts.
    let mut inbound: Option<link::Inbound> = None;
    loop {
        let body = match &inbound {
            None => read_frame(&mut stream, refuse).await?,
            Some(inbound) => tokio::select! {
                body = read_frame(&mut stream, refuse) => body?,
                () = inbound.replaced() => return Err(Ended::Replaced),
            },
        };
        let (kind, payload) = session.open(&body).map_err(refuse)?;
        if inbound.is_none() {
            inbound = Some(link.inbound_authenticated());
        }
        counters.peer(from, |p| p.bytes_received += 4 + body.len() as u64);
        let message = match kind {
            Kind::Keepalive => continue,
            Kind::Synced => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                counters.peer(from, |p| p.last_full_sync = Some(now));
                Received::Synced { from }
            }
            Kind::Entries => {
                let (entries, malformed) = wire::entries(payload);
                if malformed > 0 {
                    return Err(refuse(Refusal::Malformed));
                }
                if !budget.take(entries.len() as u64, Instant::now()) {
                    return Err(refuse(Refusal::Rate));
                }
                counters.peer(from, |p| p.entries_received += entries.len() as u64);
                Received::Entries { from, entries }
            }
        };
        received.send(message).await.map_err(|_| Ended::Stopped)?;
    }
}

/// One frame's body (after its length field), read within `SILENCE`; a length over the
/// limit is refused with `refuse`.
async fn read_frame(
    stream: &mut TcpStream,
    refuse: impl Fn(Refusal) -> Ended,
) -> Result<Vec<u8>, Ended> {
    let mut len = [0u8; 4];
    timeout(SILENCE, stream.read_exact(&mut len))
        .await
        .map_err(|_| Ended::Silent)??;
    let mut body = vec![0u8; Session::frame_len(len).map_err(refuse)?];
    timeout(SILENCE, stream.read_exact(&mut body))
        .await
        .map_err(|_| Ended::Silent)??;
    Ok(body)
}

/// Entries a connection may deliver per second (a burst of one second's worth).
struct RateBudget {
    per_second: u64,
    available: u64,
    refilled: Instant,
}

impl RateBudget {
    fn new(per_second: u32) -> Self {
        Self {
            per_second: u64::from(per_second),
            available: u64::from(per_second),
            refilled: Instant::now(),
        }
    }

    fn take(&mut self, n: u64, now: Instant) -> bool {
        let elapsed = now.duration_since(self.refilled);
        let refill = (elapsed.as_secs_f64() * self.per_second as f64) as u64;
        if refill > 0 {
            self.available = (self.available + refill).min(self.per_second);
            self.refilled = now;
        }
        if n > self.available {
            return false;
        }
        self.available -= n;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_budget_refills_by_the_second() {
        let t0 = Instant::now();
        let mut b = RateBudget::new(1000);
        assert!(b.take(800, t0));
        assert!(!b.take(300, t0));
        assert!(b.take(300, t0 + Duration::from_millis(200)));
        assert!(
            !b.take(2000, t0 + Duration::from_secs(10)),
            "bursts stay bounded"
        );
    }
}
