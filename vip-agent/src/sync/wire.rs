//! The flow-state sharing protocol on the wire: one TCP connection per direction between two
//! LB nodes; the connecting node pushes, the accepting node listens.
//!
//! ```text
//! connector → acceptor   HELLO   version, connector nonce (16)
//! acceptor  → connector  HELLO   version, acceptor nonce (16), proof = HMAC(key, "vip-sync acceptor" | both nonces)
//! connector → acceptor   frames  len u32 | kind u8 | seq u64 | payload | HMAC(key, "vip-sync" | both nonces | kind | seq | payload)
//! ```
//!
//! Both nonces are fresh per connection, so a frame recorded on one connection fails on any
//! other; within one, `seq` must be the previous one plus one, so a replayed or reordered frame
//! fails. The acceptor proves the key before the connector sends anything, so flows are only
//! told to a node that holds the key. Everything read is bounded (`MAX_FRAME`) and checked
//! before it is trusted; a refusal has a reason, counted by the receiver.

use std::net::IpAddr;

use ring::hmac;

/// Protocol version in HELLO.
pub const VERSION: u8 = 1;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes of a HELLO: version, nonce, and (from the acceptor) a proof; the connector sends
/// zeros in the proof's place.
pub const HELLO_LEN: usize = 1 + NONCE_LEN + TAG_LEN;
/// Bytes of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Bytes of a frame's header: length (of what follows it), kind, sequence number.
pub const HEADER_LEN: usize = 4 + 1 + 8;
/// Bytes of one entry.
pub const ENTRY_LEN: usize = 64;
/// Largest frame accepted (after the length field): header rest, payload, tag.
pub const MAX_FRAME: usize = 1 << 20;
/// Entries per frame a sender packs (a frame stays well under `MAX_FRAME`).
pub const ENTRIES_PER_FRAME: usize = 4096;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Exceptions, `ENTRY_LEN` bytes each.
    Entries = 1,
    /// Every exception the sender holds has been sent since the connection opened (or since
    /// the last `Synced`): a starting node waits for this from each peer.
    Synced = 2,
    /// Nothing to say; keeps an idle connection's silence from looking like a dead peer.
    Keepalive = 3,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Entries),
            2 => Some(Self::Synced),
            3 => Some(Self::Keepalive),
            _ => None,
        }
    }
}

/// Why something received was refused (the label it is counted under).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Refusal {
    #[error("a protocol version this node does not speak")]
    Version,
    #[error("the peer does not hold the key (proof or tag does not verify)")]
    Authentication,
    #[error("a sequence number out of order (replayed or reordered)")]
    Replay,
    #[error("a frame larger than the limit")]
    Oversized,
    #[error("a truncated or malformed frame")]
    Malformed,
    #[error("an address that is not a configured peer")]
    NotAPeer,
    #[error("more entries per second than the limit")]
    Rate,
}

impl Refusal {
    /// Every reason, for metrics that show zeros too.
    pub const ALL: [Refusal; 7] = [
        Refusal::Version,
        Refusal::Authentication,
        Refusal::Replay,
        Refusal::Oversized,
        Refusal::Malformed,
        Refusal::NotAPeer,
        Refusal::Rate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Version => "version",
            Refusal::Authentication => "authentication",
            Refusal::Replay => "replay",
            Refusal::Oversized => "oversized",
            Refusal::Malformed => "malformed",
            Refusal::NotAPeer => "not_a_peer",
            Refusal::Rate => "rate",
        }
    }
}

/// A flow that the current tables would send elsewhere, in node-independent form: the flow,
/// its VIP, the backend by address, and how long it has been idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub protocol: u8,
    pub client: IpAddr,
    pub client_port: u16,
    pub vip: IpAddr,
    /// The flow's destination port.
    pub vip_port: u16,
    /// The VIP's configured port: `vip_port`, or 0 for an all-ports VIP.
    pub service_port: u16,
    pub backend: IpAddr,
    /// Milliseconds since the flow's last packet on the sender (UDP; 0 for TCP).
    pub idle_ms: u32,
}

fn addr_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn addr_of(family: u8, b: &[u8]) -> Option<IpAddr> {
    let b: [u8; 16] = b.try_into().ok()?;
    match family {
        4 if b[4..] == [0; 12] => Some(IpAddr::from([b[0], b[1], b[2], b[3]])),
        6 => Some(IpAddr::from(b)),
        _ => None,
    }
}

impl Entry {
    /// `family | protocol | 0 | 0 | client (16) | vip (16) | backend (16) | client port |
    /// vip port | service port | 0 0 | idle ms (u32)`, network order.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let family = if self.vip.is_ipv4() { 4 } else { 6 };
        out.extend_from_slice(&[family, self.protocol, 0, 0]);
        out.extend_from_slice(&addr_bytes(self.client));
        out.extend_from_slice(&addr_bytes(self.vip));
        out.extend_from_slice(&addr_bytes(self.backend));
        out.extend_from_slice(&self.client_port.to_be_bytes());
        out.extend_from_slice(&self.vip_port.to_be_bytes());
        out.extend_from_slice(&self.service_port.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.idle_ms.to_be_bytes());
    }

    /// One entry from exactly `ENTRY_LEN` bytes; `None` for anything inconsistent (families
    /// that differ, an IPv4 address with bytes past its four, nonzero padding).
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != ENTRY_LEN || b[2..4] != [0, 0] || b[58..60] != [0, 0] {
            return None;
        }
        let family = b[0];
        let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
        let entry = Self {
            protocol: b[1],
            client: addr_of(family, &b[4..20])?,
            vip: addr_of(family, &b[20..36])?,
            backend: addr_of(family, &b[36..52])?,
            client_port: port(52),
            vip_port: port(54),
            service_port: port(56),
            idle_ms: u32::from_be_bytes([b[60], b[61], b[62], b[63]]),
        };
        let consistent = entry.backend.is_ipv4() == entry.vip.is_ipv4()
            && (entry.service_port == 0 || entry.service_port == entry.vip_port);
        consistent.then_some(entry)
    }
}

/// The shared key.
#[derive(Clone)]
pub struct Key(hmac::Key);

impl Key {
    pub fn new(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    fn tag(&self, parts: &[&[u8]]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        for p in parts {
            ctx.update(p);
        }
        ctx.sign()
    }

    fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        hmac::verify(&self.0, &parts.concat(), tag).is_ok()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

const ACCEPTOR: &[u8] = b"vip-sync acceptor";
const FRAME: &[u8] = b"vip-sync";

/// The connector's HELLO.
pub fn connector_hello(nonce: &[u8; NONCE_LEN]) -> [u8; HELLO_LEN] {
    let mut h = [0; HELLO_LEN];
    h[0] = VERSION;
    h[1..=NONCE_LEN].copy_from_slice(nonce);
    h
}

/// Reads the connector's HELLO: its nonce.
pub fn read_connector_hello(h: &[u8; HELLO_LEN]) -> Result<[u8; NONCE_LEN], Refusal> {
    if h[0] != VERSION {
        return Err(Refusal::Version);
    }
    Ok(h[1..=NONCE_LEN].try_into().expect("nonce length"))
}

/// The acceptor's HELLO: its nonce and the proof that it holds the key.
pub fn acceptor_hello(
    key: &Key,
    connector: &[u8; NONCE_LEN],
    acceptor: &[u8; NONCE_LEN],
) -> [u8; HELLO_LEN] {
    let mut h = [0; HELLO_LEN];
    h[0] = VERSION;
    h[1..=NONCE_LEN].copy_from_slice(acceptor);
    let tag = key.tag(&[ACCEPTOR, connector, acceptor]);
    h[1 + NONCE_LEN..].copy_from_slice(tag.as_ref());
    h
}

/// Checks the acceptor's HELLO against the connector's nonce: the acceptor's nonce.
pub fn read_acceptor_hello(
    key: &Key,
    connector: &[u8; NONCE_LEN],
    h: &[u8; HELLO_LEN],
) -> Result<[u8; NONCE_LEN], Refusal> {
    if h[0] != VERSION {
        return Err(Refusal::Version);
    }
    let acceptor: [u8; NONCE_LEN] = h[1..=NONCE_LEN].try_into().expect("nonce length");
    if !key.verify(&[ACCEPTOR, connector, &acceptor], &h[1 + NONCE_LEN..]) {
        return Err(Refusal::Authentication);
    }
    Ok(acceptor)
}

/// One direction of an authenticated connection: the session's nonces and the sequence.
pub struct Session {
    key: Key,
    nonces: [u8; 2 * NONCE_LEN],
    /// The last sequence number sent or accepted.
    seq: u64,
}

impl Session {
    pub fn new(key: Key, connector: &[u8; NONCE_LEN], acceptor: &[u8; NONCE_LEN]) -> Self {
        let mut nonces = [0; 2 * NONCE_LEN];
        nonces[..NONCE_LEN].copy_from_slice(connector);
        nonces[NONCE_LEN..].copy_from_slice(acceptor);
        Self {
            key,
            nonces,
            seq: 0,
        }
    }

    /// A whole frame, ready to write.
    pub fn seal(&mut self, kind: Kind, payload: &[u8]) -> Vec<u8> {
        self.seq += 1;
        let seq = self.seq.to_be_bytes();
        let kind_byte = [kind as u8];
        let tag = self
            .key
            .tag(&[FRAME, &self.nonces, &kind_byte, &seq, payload]);
        let len = (1 + 8 + payload.len() + TAG_LEN) as u32;
        let mut out = Vec::with_capacity(4 + len as usize);
        out.extend_from_slice(&len.to_be_bytes());
        out.push(kind as u8);
        out.extend_from_slice(&seq);
        out.extend_from_slice(payload);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The length a frame's first four bytes announce, if acceptable.
    pub fn frame_len(header: [u8; 4]) -> Result<usize, Refusal> {
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_FRAME {
            return Err(Refusal::Oversized);
        }
        if len < 1 + 8 + TAG_LEN {
            return Err(Refusal::Malformed);
        }
        Ok(len)
    }

    /// Checks a frame's body (what follows its length): its kind and payload.
    pub fn open<'a>(&mut self, body: &'a [u8]) -> Result<(Kind, &'a [u8]), Refusal> {
        if body.len() < 1 + 8 + TAG_LEN || body.len() > MAX_FRAME {
            return Err(Refusal::Malformed);
        }
        let (head, tag) = body.split_at(body.len() - TAG_LEN);
        let (kind_byte, rest) = head.split_at(1);
        let (seq, payload) = rest.split_at(8);
        if !self
            .key
            .verify(&[FRAME, &self.nonces, kind_byte, seq, payload], tag)
        {
            return Err(Refusal::Authentication);
        }
        let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
        if seq != self.seq + 1 {
            return Err(Refusal::Replay);
        }
        let kind = Kind::from_u8(kind_byte[0]).ok_or(Refusal::Malformed)?;
        if (kind == Kind::Entries) == payload.is_empty() || payload.len() % ENTRY_LEN != 0 {
            return Err(Refusal::Malformed);
        }
        self.seq = seq;
        Ok((kind, payload))
    }
}

/// The entries of an `Entries` payload (already a whole number of entries); entries that do
/// not decode are counted out as malformed.
pub fn entries(payload: &[u8]) -> (Vec<Entry>, usize) {
    let mut good = Vec::with_capacity(payload.len() / ENTRY_LEN);
    let mut bad = 0;
    for chunk in payload.chunks_exact(ENTRY_LEN) {
        match Entry::decode(chunk) {
            Some(e) => good.push(e),
            None => bad += 1,
        }
    }
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            protocol: 6,
            client: "198.18.0.10".parse().unwrap(),
            client_port: 40_000,
            vip: "198.19.0.1".parse().unwrap(),
            vip_port: 80,
            service_port: 80,
            backend: "198.18.12.2".parse().unwrap(),
            idle_ms: 1500,
        }
    }

    fn pair() -> (Session, Session) {
        let key = Key::new(b"a key of the tier, 32 bytes long");
        let (c, a) = ([1; NONCE_LEN], [2; NONCE_LEN]);
        (Session::new(key.clone(), &c, &a), Session::new(key, &c, &a))
    }

    #[test]
    fn entries_round_trip_and_inconsistent_ones_are_refused() {
        let mut v6 = entry();
        v6.client = "fd00:18::10".parse().unwrap();
        v6.vip = "fd00:19::1".parse().unwrap();
        v6.backend = "fd00:18:12::2".parse().unwrap();
        for e in [entry(), v6] {
            let mut b = Vec::new();
            e.encode(&mut b);
            assert_eq!(b.len(), ENTRY_LEN);
            assert_eq!(Entry::decode(&b), Some(e));
        }
        let mut b = Vec::new();
        entry().encode(&mut b);
        b[30] = 1; // bytes past an IPv4 VIP's four
        assert_eq!(Entry::decode(&b), None);
        let mut b = Vec::new();
        Entry {
            service_port: 443,
            ..entry()
        }
        .encode(&mut b);
        assert_eq!(Entry::decode(&b), None, "a service port the flow is not to");
    }

    #[test]
    fn frames_verify_once_in_order_on_their_own_connection_only() {
        let (mut tx, mut rx) = pair();
        let mut payload = Vec::new();
        entry().encode(&mut payload);
        let first = tx.seal(Kind::Entries, &payload);
        let second = tx.seal(Kind::Synced, &[]);
        assert_eq!(
            Session::frame_len(first[..4].try_into().unwrap()),
            Ok(first.len() - 4)
        );
        // Out of order, then in order, then again (a replay).
        assert_eq!(rx.open(&second[4..]), Err(Refusal::Replay));
        let (kind, got) = rx.open(&first[4..]).unwrap();
        assert_eq!((kind, entries(got)), (Kind::Entries, (vec![entry()], 0)));
        assert_eq!(rx.open(&second[4..]).unwrap().0, Kind::Synced);
        assert_eq!(rx.open(&second[4..]), Err(Refusal::Replay));
        // Another connection (other nonces) or another key: nothing verifies.
        let key = Key::new(b"a key of the tier, 32 bytes long");
        let mut other = Session::new(key, &[1; NONCE_LEN], &[3; NONCE_LEN]);
        assert_eq!(other.open(&first[4..]), Err(Refusal::Authentication));
        let mut wrong = Session::new(Key::new(b"another key"), &[1; NONCE_LEN], &[2; NONCE_LEN]);
        assert_eq!(wrong.open(&first[4..]), Err(Refusal::Authentication));
        // A flipped bit anywhere.
        let (mut tx, mut rx) = pair();
        let mut frame = tx.seal(Kind::Entries, &payload);
        frame[20] ^= 1;
        assert_eq!(rx.open(&frame[4..]), Err(Refusal::Authentication));
    }

    #[test]
    fn the_acceptor_proves_the_key_for_this_connection() {
        let key = Key::new(b"k");
        let (c, a) = ([7; NONCE_LEN], [9; NONCE_LEN]);
        let hello = acceptor_hello(&key, &c, &a);
        assert_eq!(read_acceptor_hello(&key, &c, &hello), Ok(a));
        assert_eq!(
            read_acceptor_hello(&key, &[8; NONCE_LEN], &hello),
            Err(Refusal::Authentication),
            "a HELLO recorded for another connection"
        );
        assert_eq!(
            read_acceptor_hello(&Key::new(b"other"), &c, &hello),
            Err(Refusal::Authentication)
        );
        assert_eq!(read_connector_hello(&connector_hello(&c)), Ok(c));
        let mut old = connector_hello(&c);
        old[0] = 0;
        assert_eq!(read_connector_hello(&old), Err(Refusal::Version));
    }

    #[test]
    fn a_hundred_thousand_malformed_frames_change_nothing() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let (mut tx, mut rx) = pair();
        let mut payload = Vec::new();
        for _ in 0..3 {
            entry().encode(&mut payload);
        }
        let good = tx.seal(Kind::Entries, &payload);
        for i in 0..100_000 {
            let mut f = if i % 2 == 0 {
                good.clone()
            } else {
                let len = rng.random_range(0..200);
                (0..len).map(|_| rng.random()).collect()
            };
            if !f.is_empty() {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..f.len());
                    f[at] = rng.random();
                }
                f.truncate(rng.random_range(0..=f.len()));
            }
            if f.len() >= 4 {
                let _ = Session::frame_len(f[..4].try_into().unwrap());
            }
            let body = f.get(4..).unwrap_or_default();
            if let Ok((_, payload)) = rx.open(body) {
                // Only an untouched frame verifies; the session then moves on.
                assert_eq!(body, &good[4..]);
                let _ = entries(payload);
                rx = pair().1;
            }
            let _ = Entry::decode(body.get(..ENTRY_LEN).unwrap_or_default());
        }
        // The genuine frame still opens on a fresh session: nothing was spent.
        assert!(pair().1.open(&good[4..]).is_ok());
    }
}
