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
//! only until `fetch_timeout`.

pub mod exceptions;
pub mod wire;

use std::{
    collections::{HashMap, HashSet},
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
        let mut tasks = Vec::new();
        for peer in &config.peers {
            counters.peer(peer.ip(), |_| {});
            tasks.push(tokio::spawn(push(
                *peer,
                key.clone(),
                exceptions_rx.clone(),
                counters.clone(),
            )));
        }
        tasks.push(tokio::spawn(accept(
            listener.0,
            Arc::new(peers.iter().copied().collect()),
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
/// again whenever they change; keepalives in between. Reconnects until the service stops.
async fn push(
    peer: SocketAddr,
    key: Key,
    mut exceptions: watch::Receiver<Arc<Vec<Entry>>>,
    counters: Counters,
) {
    loop {
        let result = push_once(peer, &key, &mut exceptions, &counters).await;
        counters.peer(peer.ip(), |p| p.outbound_up = false);
        if let Err(e) = result {
            debug!(%peer, error = %e, "flow-state push connection ended");
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

async fn push_once(
    peer: SocketAddr,
    key: &Key,
    exceptions: &mut watch::Receiver<Arc<Vec<Entry>>>,
    counters: &Counters,
) -> std::io::Result<()> {
    let mut stream = timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(peer)).await??;
    stream.set_nodelay(true)?;
    let nonce: [u8; NONCE_LEN] = rand_nonce();
    stream.write_all(&wire::connector_hello(&nonce)).await?;
    let mut hello = [0u8; HELLO_LEN];
    timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut hello)).await??;
    let acceptor = wire::read_acceptor_hello(key, &nonce, &hello).map_err(|why| {
        counters.refuse(why);
        std::io::Error::other(why)
    })?;
    let mut session = Session::new(key.clone(), &nonce, &acceptor);
    counters.peer(peer.ip(), |p| p.outbound_up = true);
    info!(%peer, "pushing flow state to the peer");
    loop {
        let entries = exceptions.borrow_and_update().clone();
        let mut bytes = 0;
        for chunk in entries.chunks(wire::ENTRIES_PER_FRAME) {
            let mut payload = Vec::with_capacity(chunk.len() * wire::ENTRY_LEN);
            for e in chunk {
                e.encode(&mut payload);
            }
            let frame = session.seal(Kind::Entries, &payload);
            stream.write_all(&frame).await?;
            bytes += frame.len() as u64;
        }
        let frame = session.seal(Kind::Synced, &[]);
        stream.write_all(&frame).await?;
        bytes += frame.len() as u64;
        counters.peer(peer.ip(), |p| {
            p.entries_sent += entries.len() as u64;
            p.bytes_sent += bytes;
        });
        loop {
            match timeout(KEEPALIVE, exceptions.changed()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return Ok(()),
                Err(_) => {
                    let frame = session.seal(Kind::Keepalive, &[]);
                    stream.write_all(&frame).await?;
                }
            }
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
    peers: Arc<HashSet<IpAddr>>,
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
        if !peers.contains(&from_ip) {
            counters.refuse(Refusal::NotAPeer);
            warn!(%from, "flow-state connection from an address that is not a peer: refused");
            continue;
        }
        let (key, received, counters) = (key.clone(), received.clone(), counters.clone());
        tokio::spawn(async move {
            counters.peer(from_ip, |p| p.inbound_up = true);
            let result = receive(
                stream,
                from_ip,
                &key,
                max_entries_per_second,
                &received,
                &counters,
            )
            .await;
            counters.peer(from_ip, |p| p.inbound_up = false);
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
    #[error("the runtime stopped")]
    Stopped,
}

async fn receive(
    mut stream: TcpStream,
    from: IpAddr,
    key: &Key,
    max_entries_per_second: u32,
    received: &mpsc::Sender<Received>,
    counters: &Counters,
) -> Result<(), Ended> {
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
    loop {
        let mut len = [0u8; 4];
        timeout(SILENCE, stream.read_exact(&mut len))
            .await
            .map_err(|_| Ended::Silent)??;
        let len = Session::frame_len(len).map_err(refuse)?;
        let mut body = vec![0u8; len];
        timeout(SILENCE, stream.read_exact(&mut body))
            .await
            .map_err(|_| Ended::Silent)??;
        let (kind, payload) = session.open(&body).map_err(refuse)?;
        counters.peer(from, |p| p.bytes_received += 4 + len as u64);
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
