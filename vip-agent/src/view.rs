//! What the runtime publishes about itself after every change, for readers that must never wait
//! for it (`/metrics`, `status`, `backends`): a snapshot, replaced whole.

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{apply::VipAccount, config::VipName};

/// A backend's run-time condition, derived from its config, its health verdict and drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Takes new flows.
    Active,
    /// `state = "draining"` or weight 0 in the config: no new flows, established ones continue.
    Draining,
    /// Drained at run time: no new flows, established ones continue.
    Drained,
    /// Failed its health checks: out of the table, and its established flows move too.
    Down,
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Condition::Active => "active",
            Condition::Draining => "draining (config)",
            Condition::Drained => "drained",
            Condition::Down => "down",
        })
    }
}

/// The latest health check of a backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    pub up: bool,
    pub detail: String,
    pub latency: Duration,
    pub changes: u64,
    /// Every check's duration so far.
    pub durations: crate::health::verdict::Durations,
}

/// One backend of one VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    pub vip: VipName,
    pub address: IpAddr,
    pub weight: u32,
    pub condition: Condition,
    /// `None`: not health-checked.
    pub check: Option<CheckView>,
}

impl std::fmt::Display for BackendView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let check = self
            .check
            .as_ref()
            .map_or("no health check", |c| c.detail.as_str());
        write!(
            f,
            "{} {} weight {} {}: {check}",
            self.vip, self.address, self.weight, self.condition
        )
    }
}

/// The runtime's state for readers.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The datapath is attached and holds the running config.
    pub ready: bool,
    /// How each interface is attached.
    pub attached: Vec<String>,
    pub node_drained: bool,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// When the last reload was tried (seconds since the epoch), and whether it was applied.
    pub last_reload: Option<(f64, bool)>,
    /// Every configured VIP and whether it can be forwarded: announced.
    pub forwardable: Vec<(VipName, bool)>,
    /// Every backend of every VIP, in config order.
    pub backends: Vec<BackendView>,
    /// Traffic accounts of the applied VIPs.
    pub accounts: Vec<VipAccount>,
}
