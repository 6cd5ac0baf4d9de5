//! The control API's messages: one JSON document per line each way, a request and its response.

use std::{fmt, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::view::BackendView;

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
}

/// One BGP session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer: IpAddr,
    pub state: String,
    pub announced: usize,
    pub last_error: Option<String>,
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
                    if let Some(e) = &p.last_error {
                        write!(f, ", last error: {e}")?;
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
