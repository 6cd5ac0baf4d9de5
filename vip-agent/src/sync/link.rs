//! One peer's two connections as this node sees them: the one it pushes to the peer on, and
//! the one the peer pushes on. They open and fail apart, but each tells something about the
//! other.
//!
//! A peer that connects has just started or lost its connection, and this node's push
//! connection to it may be dead without knowing it: a peer host that went away without a word
//! (power lost, cut off) leaves the connection looking established until a write fails, and
//! a connection attempt made while it was away waits on SYNs it never answered. The returning
//! peer waits for this node's flow state before it announces (`fetch_timeout`), so the push
//! task, told the peer is back, abandons a pending attempt and connects at once, or sends a
//! keepalive on its connection: on a stale one, the peer's reset comes back within a round
//! trip and the task connects again without waiting `RECONNECT`. A live connection is never
//! torn down for it, so two nodes cannot keep restarting each other's connections.
//!
//! The newest receiving connection from a peer replaces any older one: that one belongs to the
//! peer's previous connection, and would otherwise linger until its silence ran out, its end
//! marking the peer's live connection down.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
};

use tokio::sync::{Notify, watch};

use super::Counters;

/// The connections with one peer.
pub(super) struct Link {
    peer: IpAddr,
    counters: Counters,
    /// The peer has connected to this node since the push connection last came up.
    back: AtomicBool,
    /// Tells the push task the peer has connected anew.
    connected: Notify,
    /// The id of the receiving connection that counts: the last to authenticate (0: none).
    inbound: watch::Sender<u64>,
}

impl Link {
    pub(super) fn new(peer: IpAddr, counters: Counters) -> Self {
        counters.peer(peer, |_| {});
        Self {
            peer,
            counters,
            back: AtomicBool::new(false),
            connected: Notify::new(),
            inbound: watch::Sender::new(0),
        }
    }

    /// The peer's address.
    pub(super) fn peer(&self) -> IpAddr {
        self.peer
    }

    /// The push connection came up (the peer proved the key).
    pub(super) fn push_up(&self) {
        self.back.store(false, Ordering::Relaxed);
        self.counters.peer(self.peer, |p| p.outbound_up = true);
    }

    /// The push connection is down.
    pub(super) fn push_down(&self) {
        self.counters.peer(self.peer, |p| p.outbound_up = false);
    }

    /// Whether the peer has connected to this node since the push connection last came up:
    /// it is up, and the push task need not wait before connecting.
    pub(super) fn peer_back(&self) -> bool {
        self.back.load(Ordering::Relaxed)
    }

    /// Resolves when the peer has connected anew (at once if it did while nobody waited).
    pub(super) async fn peer_connected(&self) {
        self.connected.notified().await;
    }

    /// A receiving connection from the peer authenticated: it becomes the one that counts, and
    /// the push task hears that the peer is back.
    pub(super) fn inbound_authenticated(&self) -> Inbound<'_> {
        let mut id = 0;
        self.inbound.send_modify(|current| {
            *current += 1;
            id = *current;
        });
        self.counters.peer(self.peer, |p| p.inbound_up = true);
        self.back.store(true, Ordering::Relaxed);
        self.connected.notify_one();
        Inbound { link: self, id }
    }
}

/// A receiving connection that authenticated: while it lives and no newer one has replaced
/// it, the peer's receive side is up.
pub(super) struct Inbound<'a> {
    link: &'a Link,
    id: u64,
}

impl Inbound<'_> {
    /// Resolves when a newer receiving connection from the peer has authenticated.
    pub(super) async fn replaced(&self) {
        let mut current = self.link.inbound.subscribe();
        // The sender lives in the link, which outlives this connection.
        let _ = current.wait_for(|current| *current != self.id).await;
    }
}

impl Drop for Inbound<'_> {
    fn drop(&mut self) {
        if *self.link.inbound.borrow() == self.id {
            self.link
                .counters
                .peer(self.link.peer, |p| p.inbound_up = false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive_up(counters: &Counters, peer: IpAddr) -> bool {
        let stats = counters.snapshot();
        stats.peers.iter().any(|(p, s)| *p == peer && s.inbound_up)
    }

    #[tokio::test]
    async fn a_newer_receiving_connection_replaces_the_older_and_only_its_end_counts() {
        let peer: IpAddr = "198.18.2.2".parse().unwrap();
        let counters = Counters::default();
        let link = Link::new(peer, counters.clone());
        let older = link.inbound_authenticated();
        assert!(receive_up(&counters, peer));
        let newer = link.inbound_authenticated();
        // Resolves only because it was replaced.
        older.replaced().await;
        drop(older);
        assert!(
            receive_up(&counters, peer),
            "the older one's end marked the peer down"
        );
        drop(newer);
        assert!(!receive_up(&counters, peer));
    }

    #[tokio::test]
    async fn the_push_task_hears_that_the_peer_is_back_until_its_connection_comes_up() {
        let link = Link::new("198.18.2.2".parse().unwrap(), Counters::default());
        assert!(!link.peer_back());
        let _inbound = link.inbound_authenticated();
        assert!(link.peer_back());
        // Told even though nobody was waiting when it connected.
        link.peer_connected().await;
        link.push_up();
        assert!(!link.peer_back());
    }
}
