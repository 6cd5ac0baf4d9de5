//! One BFD session's state machine (RFC 5880 section 6.8), without I/O: the runner feeds it
//! received packets and the clock and sends the packets it asks for, so every rule here is
//! tested on the host with a clock the test moves.
//!
//! vip takes the Active role in asynchronous mode: it sends from the start, at most once a
//! second until the session is Up (section 6.8.3), then at the configured rate. A change of
//! its intervals while Up runs a Poll Sequence: until the peer's Final, the old transmit
//! interval stays in force if the new one is longer and the old receive interval if the new
//! one is shorter, so neither side ever expects packets faster than the other sends them.

use std::time::{Duration, Instant};

use super::packet::{Control, Diag, State};

/// What an operator sets for a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Timers {
    /// Desired Min TX Interval: how often we would like to send.
    #[serde(serialize_with = "milliseconds")]
    pub min_tx: Duration,
    /// Required Min RX Interval: how often we can take packets.
    #[serde(serialize_with = "milliseconds")]
    pub min_rx: Duration,
    /// Detect Mult: the peer declares us down after this many of our intervals without one.
    pub multiplier: u8,
}

/// Timers show in milliseconds, as they are configured.
fn milliseconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// While a session is not Up, packets go at most once a second (section 6.8.3).
const SLOW: Duration = Duration::from_secs(1);

/// What a session shows in `status` and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Status {
    pub state: State,
    pub remote_state: State,
    /// Why the session last went down (ours).
    pub diag: Diag,
    pub local_discriminator: u32,
    pub remote_discriminator: u32,
    /// The interval we send at now (ours and the peer's receive rate, the larger).
    pub tx_interval: Duration,
    /// How long without a packet until we declare the peer down (0 before the first packet).
    pub detection_time: Duration,
    /// Times the session left Up.
    pub flaps: u64,
}

/// What a received packet asks the runner to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Reaction {
    /// Answer a Poll with a Final at once.
    pub send_final: bool,
    /// The state changed: tell the peer at once rather than at the next interval.
    pub changed: bool,
}

/// One session.
#[derive(Clone, Debug)]
pub struct Session {
    local_discriminator: u32,
    remote_discriminator: u32,
    state: State,
    remote_state: State,
    diag: Diag,
    configured: Timers,
    /// Desired Min TX and Required Min RX as we send them.
    desired_tx: Duration,
    required_rx: Duration,
    /// The values in force while a Poll Sequence runs (then the sent ones).
    tx_in_use: Duration,
    rx_in_use: Duration,
    polling: bool,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_multiplier: u8,
    detection_deadline: Option<Instant>,
    flaps: u64,
}

impl Session {
    /// A session in Down, identified by `local_discriminator` (non-zero, unique on the node).
    pub fn new(local_discriminator: u32, timers: Timers) -> Self {
        let desired_tx = timers.min_tx.max(SLOW);
        Self {
            local_discriminator,
            remote_discriminator: 0,
            state: State::Down,
            remote_state: State::Down,
            diag: Diag::None,
            configured: timers,
            desired_tx,
            required_rx: timers.min_rx,
            tx_in_use: desired_tx,
            rx_in_use: timers.min_rx,
            polling: false,
            // Section 6.8.1: 1 microsecond until the peer says otherwise.
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            remote_multiplier: 0,
            detection_deadline: None,
            flaps: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn local_discriminator(&self) -> u32 {
        self.local_discriminator
    }

    /// New timers from a reload; while Up they take effect through a Poll Sequence.
    pub fn set_timers(&mut self, timers: Timers) {
        self.configured = timers;
        self.advertise();
    }

    /// Brings what we send in line with the state and the configured timers.
    fn advertise(&mut self) {
        let tx = if self.state == State::Up {
            self.configured.min_tx
        } else {
            self.configured.min_tx.max(SLOW)
        };
        let rx = self.configured.min_rx;
        if (tx, rx) == (self.desired_tx, self.required_rx) {
            return;
        }
        self.desired_tx = tx;
        self.required_rx = rx;
        if self.state == State::Up {
            // Never send slower, nor expect faster, than the peer has confirmed.
            self.tx_in_use = self.tx_in_use.min(tx);
            self.rx_in_use = self.rx_in_use.max(rx);
            self.polling = true;
        } else {
            self.tx_in_use = tx;
            self.rx_in_use = rx;
        }
    }

    /// A packet for this session (the runner found it by discriminator or address), at `now`.
    pub fn receive(&mut self, c: &Control, now: Instant) -> Reaction {
        if c.final_ && self.polling {
            self.polling = false;
            self.tx_in_use = self.desired_tx;
            self.rx_in_use = self.required_rx;
        }
        self.remote_discriminator = c.my_discriminator;
        self.remote_state = c.state;
        self.remote_min_rx = Duration::from_micros(u64::from(c.required_min_rx_us));
        self.remote_desired_tx = Duration::from_micros(u64::from(c.desired_min_tx_us));
        self.remote_multiplier = c.detect_mult;
        self.detection_deadline = Some(now + self.detection_time());

        let before = self.state;
        let next = match (self.state, c.state) {
            (State::AdminDown, _) => State::AdminDown,
            (_, State::AdminDown) | (State::Up, State::Down) => State::Down,
            (State::Down, State::Down) => State::Init,
            (State::Down, State::Init) | (State::Init, State::Init | State::Up) => State::Up,
            (state, _) => state,
        };
        if before != State::Down && next == State::Down {
            self.diag = Diag::NeighborSignaledSessionDown;
        }
        self.enter(next);
        Reaction {
            send_final: c.poll,
            changed: self.state != before,
        }
    }

    /// Runs the detection timer: true if the session went down at `now`.
    pub fn expire(&mut self, now: Instant) -> bool {
        if self.detection_deadline.is_none_or(|d| now < d) {
            return false;
        }
        self.detection_deadline = None;
        self.remote_discriminator = 0;
        self.remote_state = State::Down;
        if matches!(self.state, State::Init | State::Up) {
            self.diag = Diag::ControlDetectionTimeExpired;
            self.enter(State::Down);
            return true;
        }
        false
    }

    /// Ends the session from our side (the agent stops): the peer must not treat it as a
    /// failure of the path (RFC 5882 section 3.2).
    pub fn admin_down(&mut self) {
        self.diag = Diag::AdministrativelyDown;
        self.enter(State::AdminDown);
    }

    fn enter(&mut self, state: State) {
        if self.state == State::Up && state != State::Up {
            self.flaps += 1;
        }
        self.state = state;
        self.advertise();
    }

    /// When the detection timer runs out, if it runs.
    pub fn detection_deadline(&self) -> Option<Instant> {
        self.detection_deadline
    }

    /// The peer's Detect Mult times the slower of its sending and our receiving.
    fn detection_time(&self) -> Duration {
        self.rx_in_use.max(self.remote_desired_tx) * u32::from(self.remote_multiplier)
    }

    /// The interval between our periodic packets; `None` while the peer asks for none
    /// (Required Min RX Interval 0, section 6.8.7).
    pub fn tx_interval(&self) -> Option<Duration> {
        (!self.remote_min_rx.is_zero()).then(|| self.tx_in_use.max(self.remote_min_rx))
    }

    /// The delay to the next periodic packet: the interval less a jitter of up to 25% (10%
    /// more with a Detect Mult of 1), from `random` in 0..=1.
    pub fn next_tx_delay(&self, random: f64) -> Option<Duration> {
        let span = if self.configured.multiplier == 1 {
            0.15
        } else {
            0.25
        };
        self.tx_interval()
            .map(|i| i.mul_f64(0.75 + span * random.clamp(0.0, 1.0)))
    }

    /// The packet to send now; `final_` answers a Poll (and then never carries a Poll itself).
    pub fn packet(&self, final_: bool) -> Control {
        Control {
            diag: self.diag,
            state: self.state,
            poll: self.polling && !final_,
            final_,
            detect_mult: self.configured.multiplier,
            my_discriminator: self.local_discriminator,
            your_discriminator: self.remote_discriminator,
            desired_min_tx_us: micros(self.desired_tx),
            required_min_rx_us: micros(self.required_rx),
        }
    }

    pub fn status(&self) -> Status {
        Status {
            state: self.state,
            remote_state: self.remote_state,
            diag: self.diag,
            local_discriminator: self.local_discriminator,
            remote_discriminator: self.remote_discriminator,
            tx_interval: self.tx_interval().unwrap_or_default(),
            detection_time: if self.remote_multiplier == 0 {
                Duration::ZERO
            } else {
                self.detection_time()
            },
            flaps: self.flaps,
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timers(tx: u64, rx: u64) -> Timers {
        Timers {
            min_tx: MS * tx as u32,
            min_rx: MS * rx as u32,
            multiplier: 3,
        }
    }

    /// The peer's packet: its state, discriminator 99, 100 ms both ways, Detect Mult 3.
    fn from_peer(state: State, your: u32) -> Control {
        Control {
            diag: Diag::None,
            state,
            poll: false,
            final_: false,
            detect_mult: 3,
            my_discriminator: 99,
            your_discriminator: your,
            desired_min_tx_us: 100_000,
            required_min_rx_us: 100_000,
        }
    }

    fn up(t0: Instant) -> Session {
        let mut s = Session::new(7, timers(100, 100));
        s.receive(&from_peer(State::Down, 0), t0);
        assert_eq!(s.state(), State::Init);
        s.receive(&from_peer(State::Up, 7), t0);
        assert_eq!(s.state(), State::Up);
        s
    }

    #[test]
    fn three_way_handshake_and_slow_rate_until_up() {
        let t0 = Instant::now();
        let mut s = Session::new(7, timers(100, 100));
        // Down: once a second at most, whatever is configured.
        assert_eq!(s.packet(false).desired_min_tx_us, 1_000_000);
        assert_eq!(s.packet(false).your_discriminator, 0);
        let r = s.receive(&from_peer(State::Down, 0), t0);
        assert!(r.changed);
        assert_eq!(s.state(), State::Init);
        assert_eq!(s.packet(false).your_discriminator, 99);
        s.receive(&from_peer(State::Up, 7), t0);
        assert_eq!(s.state(), State::Up);
        // Up: the configured rate, announced with a Poll that the peer's Final ends.
        let p = s.packet(false);
        assert_eq!(p.desired_min_tx_us, 100_000);
        assert!(p.poll);
        assert!(!s.packet(true).poll, "a Final never carries a Poll");
        assert_eq!(s.tx_interval(), Some(MS * 100));
        s.receive(
            &Control {
                final_: true,
                ..from_peer(State::Up, 7)
            },
            t0,
        );
        assert!(!s.packet(false).poll);
        assert_eq!(s.status().detection_time, MS * 300);
    }

    #[test]
    fn peer_down_and_detection_expiry_bring_it_down_with_their_diagnostics() {
        let t0 = Instant::now();
        let mut s = up(t0);
        s.receive(&from_peer(State::Down, 7), t0);
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.status().diag, Diag::NeighborSignaledSessionDown);
        assert_eq!(s.status().flaps, 1);
        s.receive(&from_peer(State::Down, 7), t0);
        assert_eq!(
            s.state(),
            State::Init,
            "and back up the three-way handshake"
        );

        let mut s = up(t0);
        let deadline = s.detection_deadline().unwrap();
        assert_eq!(deadline, t0 + MS * 300);
        assert!(!s.expire(deadline - MS));
        assert!(s.expire(deadline));
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.status().diag, Diag::ControlDetectionTimeExpired);
        assert_eq!(s.packet(false).your_discriminator, 0);
        assert_eq!(s.packet(false).desired_min_tx_us, 1_000_000);
        assert!(!s.expire(deadline + MS * 1000), "expires once");
    }

    #[test]
    fn admin_down_from_the_peer_is_not_a_failure_signal_we_ignore() {
        let t0 = Instant::now();
        let mut s = up(t0);
        s.receive(&from_peer(State::AdminDown, 7), t0);
        assert_eq!(s.state(), State::Down);
        // Still Down while the peer stays AdminDown (no Init from an AdminDown packet).
        s.receive(&from_peer(State::AdminDown, 7), t0);
        assert_eq!(s.state(), State::Down);
        s.admin_down();
        assert_eq!(s.packet(false).state, State::AdminDown);
        assert_eq!(s.packet(false).diag, Diag::AdministrativelyDown);
        s.receive(&from_peer(State::Up, 7), t0);
        assert_eq!(s.state(), State::AdminDown);
    }

    #[test]
    fn a_timer_change_while_up_runs_a_poll_sequence() {
        let t0 = Instant::now();
        let mut s = up(t0);
        s.receive(
            &Control {
                final_: true,
                ..from_peer(State::Up, 7)
            },
            t0,
        );
        // Slower sending and faster receiving: both wait for the Final.
        s.set_timers(timers(300, 50));
        let p = s.packet(false);
        assert!(p.poll);
        assert_eq!(
            (p.desired_min_tx_us, p.required_min_rx_us),
            (300_000, 50_000)
        );
        assert_eq!(s.tx_interval(), Some(MS * 100), "old TX until the Final");
        assert_eq!(
            s.status().detection_time,
            MS * 300,
            "old RX until the Final"
        );
        s.receive(
            &Control {
                final_: true,
                desired_min_tx_us: 50_000,
                required_min_rx_us: 50_000,
                ..from_peer(State::Up, 7)
            },
            t0,
        );
        assert!(!s.packet(false).poll);
        assert_eq!(s.tx_interval(), Some(MS * 300));
        assert_eq!(s.status().detection_time, MS * 150);
        // A Poll from the peer is answered with a Final.
        let r = s.receive(
            &Control {
                poll: true,
                ..from_peer(State::Up, 7)
            },
            t0,
        );
        assert!(r.send_final);
        assert!(!r.changed);
    }

    #[test]
    fn no_periodic_packets_while_the_peer_asks_for_none() {
        let t0 = Instant::now();
        let mut s = up(t0);
        s.receive(
            &Control {
                required_min_rx_us: 0,
                ..from_peer(State::Up, 7)
            },
            t0,
        );
        assert_eq!(s.tx_interval(), None);
        assert_eq!(s.next_tx_delay(0.5), None);
    }

    #[test]
    fn jitter_keeps_the_interval_between_75_and_100_percent() {
        let s = up(Instant::now());
        assert_eq!(s.next_tx_delay(0.0), Some(MS * 75));
        assert_eq!(s.next_tx_delay(1.0), Some(MS * 100));
        let mut one = Session::new(
            1,
            Timers {
                multiplier: 1,
                ..timers(100, 100)
            },
        );
        one.receive(&from_peer(State::Init, 1), Instant::now());
        assert_eq!(one.next_tx_delay(1.0), Some(MS * 90));
    }
}
