//! BFD Control packets (RFC 5880 section 4.1): the mandatory section, checked as section 6.8.6
//! asks before anything interprets it.
//!
//! vip runs no BFD authentication: a packet with the A bit is refused, as a session without
//! authentication must (section 6.8.6). Echo is not offered (Required Min Echo RX Interval 0),
//! demand mode is not used.

/// Length of the mandatory section, and of every packet vip sends.
pub const LEN: usize = 24;

/// BFD version 1.
const VERSION: u8 = 1;

/// Session states (section 4.1, "Sta").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum State {
    AdminDown,
    #[default]
    Down,
    Init,
    Up,
}

impl State {
    fn from_bits(bits: u8) -> Self {
        match bits & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    fn bits(self) -> u8 {
        match self {
            State::AdminDown => 0,
            State::Down => 1,
            State::Init => 2,
            State::Up => 3,
        }
    }
}

/// Diagnostic codes (section 4.1, "Diag"): why the session last left Up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Diag {
    #[default]
    None,
    ControlDetectionTimeExpired,
    EchoFunctionFailed,
    NeighborSignaledSessionDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    /// A code RFC 5880 does not define (31 at most).
    Other(u8),
}

impl Diag {
    fn from_bits(bits: u8) -> Self {
        match bits & 0x1f {
            0 => Diag::None,
            1 => Diag::ControlDetectionTimeExpired,
            2 => Diag::EchoFunctionFailed,
            3 => Diag::NeighborSignaledSessionDown,
            4 => Diag::ForwardingPlaneReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdministrativelyDown,
            8 => Diag::ReverseConcatenatedPathDown,
            other => Diag::Other(other),
        }
    }

    fn bits(self) -> u8 {
        match self {
            Diag::None => 0,
            Diag::ControlDetectionTimeExpired => 1,
            Diag::EchoFunctionFailed => 2,
            Diag::NeighborSignaledSessionDown => 3,
            Diag::ForwardingPlaneReset => 4,
            Diag::PathDown => 5,
            Diag::ConcatenatedPathDown => 6,
            Diag::AdministrativelyDown => 7,
            Diag::ReverseConcatenatedPathDown => 8,
            Diag::Other(code) => code & 0x1f,
        }
    }
}

/// A Control packet's mandatory section. Intervals are in microseconds, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    pub diag: Diag,
    pub state: State,
    /// P: the sender asks to confirm a parameter change.
    pub poll: bool,
    /// F: the answer to a Poll.
    pub final_: bool,
    pub detect_mult: u8,
    pub my_discriminator: u32,
    pub your_discriminator: u32,
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
}

/// Why a received packet was refused; each is counted under its `label`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("shorter than a BFD Control packet ({0} bytes)")]
    Short(usize),
    #[error("BFD version {0} (only 1 exists)")]
    Version(u8),
    #[error("length field {field} does not fit the {received} bytes received")]
    Length { field: u8, received: usize },
    #[error("authentication section present, and vip runs BFD without authentication")]
    Authenticated,
    #[error("detect multiplier 0")]
    ZeroMultiplier,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("My Discriminator 0")]
    ZeroDiscriminator,
    #[error("demand mode asked for, and vip runs asynchronous mode only")]
    Demand,
}

impl PacketError {
    /// The metrics label of this refusal.
    pub fn label(&self) -> &'static str {
        match self {
            PacketError::Short(_) | PacketError::Length { .. } => "length",
            PacketError::Version(_) => "version",
            PacketError::Authenticated => "authentication",
            PacketError::ZeroMultiplier
            | PacketError::Multipoint
            | PacketError::ZeroDiscriminator
            | PacketError::Demand => "malformed",
        }
    }
}

const POLL: u8 = 0x20;
const FINAL: u8 = 0x10;
const AUTH: u8 = 0x04;
const DEMAND: u8 = 0x02;
const MULTIPOINT: u8 = 0x01;

/// Checks and reads a received packet (the UDP payload).
pub fn decode(bytes: &[u8]) -> Result<Control, PacketError> {
    let Some(fixed) = bytes.first_chunk::<LEN>() else {
        return Err(PacketError::Short(bytes.len()));
    };
    let version = fixed[0] >> 5;
    if version != VERSION {
        return Err(PacketError::Version(version));
    }
    let flags = fixed[1];
    let length = fixed[3];
    if usize::from(length) < LEN || usize::from(length) > bytes.len() {
        return Err(PacketError::Length {
            field: length,
            received: bytes.len(),
        });
    }
    if flags & AUTH != 0 {
        return Err(PacketError::Authenticated);
    }
    if fixed[2] == 0 {
        return Err(PacketError::ZeroMultiplier);
    }
    if flags & MULTIPOINT != 0 {
        return Err(PacketError::Multipoint);
    }
    // Demand mode would silence the peer's packets; a peer may set D only when we did.
    if flags & DEMAND != 0 {
        return Err(PacketError::Demand);
    }
    let word =
        |at: usize| u32::from_be_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]]);
    let my_discriminator = word(4);
    if my_discriminator == 0 {
        return Err(PacketError::ZeroDiscriminator);
    }
    Ok(Control {
        diag: Diag::from_bits(fixed[0]),
        state: State::from_bits(flags >> 6),
        poll: flags & POLL != 0,
        final_: flags & FINAL != 0,
        detect_mult: fixed[2],
        my_discriminator,
        your_discriminator: word(8),
        desired_min_tx_us: word(12),
        required_min_rx_us: word(16),
    })
}

/// The packet to send. Required Min Echo RX Interval is 0: vip does not loop echo packets.
pub fn encode(c: &Control) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[0] = (VERSION << 5) | c.diag.bits();
    out[1] =
        (c.state.bits() << 6) | if c.poll { POLL } else { 0 } | if c.final_ { FINAL } else { 0 };
    out[2] = c.detect_mult;
    out[3] = LEN as u8;
    out[4..8].copy_from_slice(&c.my_discriminator.to_be_bytes());
    out[8..12].copy_from_slice(&c.your_discriminator.to_be_bytes());
    out[12..16].copy_from_slice(&c.desired_min_tx_us.to_be_bytes());
    out[16..20].copy_from_slice(&c.required_min_rx_us.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Control {
        Control {
            diag: Diag::ControlDetectionTimeExpired,
            state: State::Init,
            poll: true,
            final_: false,
            detect_mult: 3,
            my_discriminator: 0x0102_0304,
            your_discriminator: 7,
            desired_min_tx_us: 100_000,
            required_min_rx_us: 300_000,
        }
    }

    #[test]
    fn round_trip() {
        let c = sample();
        assert_eq!(decode(&encode(&c)), Ok(c));
        let f = Control {
            poll: false,
            final_: true,
            state: State::Up,
            diag: Diag::None,
            ..c
        };
        assert_eq!(decode(&encode(&f)), Ok(f));
    }

    /// A peer's first packet: version 1, Down, no remote discriminator yet, 1 s while Down.
    #[test]
    fn reads_a_peers_packet() {
        let bytes = [
            0x20, 0x40, 0x05, 0x18, 0x9a, 0x3b, 0x11, 0x02, 0, 0, 0, 0, 0x00, 0x0f, 0x42, 0x40,
            0x00, 0x00, 0x27, 0x10, 0, 0, 0, 0,
        ];
        let c = decode(&bytes).unwrap();
        assert_eq!(c.state, State::Down);
        assert_eq!(c.detect_mult, 5);
        assert_eq!(c.my_discriminator, 0x9a3b_1102);
        assert_eq!(c.your_discriminator, 0);
        assert_eq!(c.desired_min_tx_us, 1_000_000);
        assert_eq!(c.required_min_rx_us, 10_000);
    }

    #[test]
    fn refuses_what_section_6_8_6_discards() {
        let good = encode(&sample());
        let with = |at: usize, value: u8| {
            let mut b = good;
            b[at] = value;
            decode(&b)
        };
        assert_eq!(decode(&good[..23]), Err(PacketError::Short(23)));
        assert_eq!(with(0, 0x40), Err(PacketError::Version(2)));
        assert!(matches!(with(3, 23), Err(PacketError::Length { .. })));
        assert!(matches!(with(3, 25), Err(PacketError::Length { .. })));
        assert_eq!(with(1, 0x80 | AUTH), Err(PacketError::Authenticated));
        assert_eq!(with(2, 0), Err(PacketError::ZeroMultiplier));
        assert_eq!(with(1, 0x80 | MULTIPOINT), Err(PacketError::Multipoint));
        assert_eq!(with(1, 0x80 | DEMAND), Err(PacketError::Demand));
        let mut zero = good;
        zero[4..8].fill(0);
        assert_eq!(decode(&zero), Err(PacketError::ZeroDiscriminator));
        // A longer length with the bytes present (an authentication section we do not read
        // would need the A bit): accepted, the rest ignored.
        let mut longer = good.to_vec();
        longer.extend([0; 4]);
        longer[3] = 28;
        assert!(decode(&longer).is_ok());
    }

    /// 100,000 random and mutated packets: every one decodes or is refused, none panics,
    /// whatever decodes encodes back to the same mandatory section, and a session fed every
    /// accepted one (as the receive path would) neither panics nor overflows its timers.
    #[test]
    fn fuzz_decoder() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5880);
        let timers = crate::bfd::Timers {
            min_tx: std::time::Duration::from_millis(10),
            min_rx: std::time::Duration::from_millis(10),
            multiplier: 3,
        };
        let mut session = crate::bfd::session::Session::new(1, timers);
        let t0 = std::time::Instant::now();
        let good = encode(&sample());
        let mut refused = 0;
        for i in 0..100_000 {
            let bytes: Vec<u8> = if i % 2 == 0 {
                let len = rng.random_range(0..64);
                (0..len).map(|_| rng.random()).collect()
            } else {
                let mut b = good.to_vec();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..b.len());
                    b[at] = rng.random();
                }
                b.truncate(rng.random_range(0..=b.len()));
                b
            };
            match decode(&bytes) {
                Ok(c) => {
                    let again = encode(&c);
                    assert_eq!(decode(&again), Ok(c));
                    let now = t0 + std::time::Duration::from_millis(i);
                    session.receive(&c, now);
                    session.expire(now);
                    let _ = (session.next_tx_delay(0.5), session.status());
                }
                Err(e) => {
                    refused += 1;
                    assert!(!e.label().is_empty());
                }
            }
        }
        assert!(refused > 50_000, "{refused}");
    }
}
