//! The agent's control API: typed requests and responses, one JSON document per line, on a
//! Unix socket (mode 0600; only root or the agent's own user may connect). The metrics
//! listener serves metrics only.

pub mod client;
mod protocol;
pub mod server;

pub use protocol::{
    AgentStatus, BfdStatus, ControlError, DrainOutcome, DrainTarget, MAX_MESSAGE, PeerStatus,
    Request, Response,
};
