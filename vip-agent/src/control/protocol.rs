//! The control API's messages: one JSON document per line each way, a request and its response.

use std::{fmt, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::view::{BackendView, EgressBlockView};

/// The largest request or response line accepted.
pub const MAX_MESSAGE: usize = 1 << 20;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// What only the running agent knows: attachments, drain, reloads, BGP sessions.
    Status,
    /// Every backend's condition and latest health check.
    Backends,
    Drain(DrainTarget),
    Undrain(DrainTarget),
}

/// What a drain names: backends by address (each of every VIP, or of `vip`; a host with an
/// IPv4 and an IPv6 address is named by both), or, with no address, the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainTarget {
    pub backends: Vec<IpAddr>,
    pub vip: Option<IpAddr>,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(AgentStatus),
    Backends(Vec<BackendView>),
    Drain(DrainOutcome),
    /// The request was understood and refused (the reason says why).
    Refused(String),
}

/// The running agent's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub ready: bool,
    pub attached: Vec<String>,
    pub node_drained: bool,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub peers: Vec<PeerStatus>,
    /// Egress blocks with an owner or resting (a backend: its own).
    pub egress: Vec<EgressBlockStatus>,
    /// Flow-state sharing, when `[sync]` is on.
    pub sync: Option<crate::sync::Stats>,
}

/// An egress block and, on a load balancer, the replies sent to its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressBlockStatus {
    pub block: EgressBlockView,
    /// `(packets, bytes)`.
    pub traffic: Option<(u64, u64)>,
}

/// One BGP session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer: IpAddr,
    pub state: String,
    pub announced: usize,
    pub last_error: Option<String>,
    /// VIPs this session cannot carry (family not negotiated, or no next hop of it).
    pub not_carried: Vec<IpAddr>,
    /// The BFD session with this peer, when BFD is on for it.
    pub bfd: Option<BfdStatus>,
}

/// One BFD session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BfdStatus {
    /// Ours: AdminDown, Down, Init, Up.
    pub state: String,
    /// As the peer last said.
    pub remote_state: String,
    /// Why the session last went down.
    pub diag: String,
    pub local_discriminator: u32,
    /// 0 until the peer is heard.
    pub remote_discriminator: u32,
    /// The negotiated interval between our packets, in microseconds (the unit on the wire).
    pub tx_interval_us: u64,
    /// Silence after which the peer is declared down, in microseconds.
    pub detection_time_us: u64,
    /// Times the session left Up.
    pub flaps: u64,
}

impl From<crate::bfd::Status> for BfdStatus {
    fn from(s: crate::bfd::Status) -> Self {
        Self {
            state: format!("{:?}", s.state),
            remote_state: format!("{:?}", s.remote_state),
            diag: format!("{:?}", s.diag),
            local_discriminator: s.local_discriminator,
            remote_discriminator: s.remote_discriminator,
            tx_interval_us: s.tx_interval.as_micros() as u64,
            detection_time_us: s.detection_time.as_micros() as u64,
            flaps: s.flaps,
        }
    }
}

/// What a drain or undrain did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainOutcome {
    pub drained: bool,
    /// Empty: the whole node.
    pub backends: Vec<IpAddr>,
    /// The VIPs (`tcp/198.51.100.1:443`) whose backends it applied to.
    pub vips: Vec<String>,
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Status(s) => {
                for a in &s.attached {
                    writeln!(f, "attached {a}")?;
                }
                let node = if s.node_drained {
                    "drained (GRACEFUL_SHUTDOWN)"
                } else {
                    "serving"
                };
                writeln!(f, "node: {node}")?;
                let ready = if s.ready {
                    "yes"
                } else {
                    "no (the last change failed)"
                };
                writeln!(f, "ready: {ready}")?;
                writeln!(
                    f,
                    "reloads: {} ok, {} failed",
                    s.reloads_ok, s.reloads_failed
                )?;
                for p in &s.peers {
                    write!(
                        f,
                        "bgp peer {}: {}, {} routes announced",
                        p.peer, p.state, p.announced
                    )?;
                    if !p.not_carried.is_empty() {
                        let vips: Vec<String> =
                            p.not_carried.iter().map(ToString::to_string).collect();
                        write!(
                            f,
                            ", not carried (family not negotiated or no next hop of it): {}",
                            vips.join(" ")
                        )?;
                    }
                    if let Some(e) = &p.last_error {
                        write!(f, ", last error: {e}")?;
                    }
                    writeln!(f)?;
                    if let Some(b) = &p.bfd {
                        writeln!(
                            f,
                            "  bfd: {}, remote {} (discriminator {}), tx {} ms, detection {} ms, {} flaps, last diagnostic {}",
                            b.state,
                            b.remote_state,
                            b.remote_discriminator,
                            b.tx_interval_us as f64 / 1e3,
                            b.detection_time_us as f64 / 1e3,
                            b.flaps,
                            b.diag
                        )?;
                    }
                }
                if let Some(sync) = &s.sync {
                    for (peer, p) in &sync.peers {
                        let up = |b: bool| if b { "up" } else { "down" };
                        writeln!(
                            f,
                            "sync peer {peer}: push {}, receive {}, {} entries sent, {} received{}{}",
                            up(p.outbound_up),
                            up(p.inbound_up),
                            p.entries_sent,
                            p.entries_received,
                            match p.last_full_sync {
                                Some(t) => format!(", last full sync at {t} s (epoch)"),
                                None => ", no full sync yet".into(),
                            },
                            if p.started_without_state {
                                ", started without its state"
                            } else {
                                ""
                            }
                        )?;
                    }
                    let nonzero = |v: &[(String, u64)]| {
                        v.iter()
                            .filter(|(_, n)| *n > 0)
                            .map(|(r, n)| format!("{r} {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    writeln!(
                        f,
                        "sync: {} entries applied; rejected: [{}]; refused: [{}]",
                        sync.applied,
                        nonzero(&sync.rejected),
                        nonzero(&sync.refused)
                    )?;
                }
                for e in &s.egress {
                    write!(f, "{}", e.block)?;
                    if let Some((packets, bytes)) = e.traffic {
                        write!(f, ", {packets} packets, {bytes} bytes to the owner")?;
                    }
                    writeln!(f)?;
                }
                Ok(())
            }
            Response::Backends(backends) if backends.is_empty() => {
                writeln!(f, "no backends")
            }
            Response::Backends(backends) => {
                for b in backends {
                    writeln!(f, "{b}")?;
                }
                Ok(())
            }
            Response::Drain(d) => {
                let word = if d.drained { "drained" } else { "undrained" };
                if d.backends.is_empty() {
                    return writeln!(f, "node {word}");
                }
                let backends: Vec<String> = d.backends.iter().map(IpAddr::to_string).collect();
                writeln!(
                    f,
                    "{word} {} on {} VIPs: {}",
                    backends.join(" and "),
                    d.vips.len(),
                    d.vips.join(", ")
                )
            }
            Response::Refused(why) => writeln!(f, "refused: {why}"),
        }
    }
}

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no agent at {path} (is it running? its node.control_socket?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another agent answers on {0}")]
    InUse(PathBuf),
    #[error("talking to the agent")]
    Io(#[from] std::io::Error),
    #[error("a message that is not valid")]
    Malformed(#[from] serde_json::Error),
    #[error("a message longer than {MAX_MESSAGE} bytes")]
    TooLong,
}
