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
    /// Egress blocks with an owner or resting (load balancer: all; backend: its own).
    pub egress: Vec<EgressBlockView>,
}

/// What an egress block is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockState {
    /// Replies to its ports go to its owner (which source-NATs into it).
    Active,
    /// Its backend left lately: replies to its ports are dropped until the rest ends.
    Resting,
}

/// One egress block of a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressBlockView {
    pub vip: IpAddr,
    pub block: u16,
    pub first_port: u16,
    pub last_port: u16,
    /// Its backend in the config (after a rest, the new one); `None`: nobody yet.
    pub owner: Option<IpAddr>,
    pub state: BlockState,
    /// While resting: the backend that left it, and the rest left.
    pub previous: Option<IpAddr>,
    pub rest_left: Option<Duration>,
    /// Load balancer: the datapath id of its owner's entry, whose counters are its traffic.
    pub backend_id: Option<vip_common::BackendId>,
}

impl EgressBlockView {
    /// Every block of `sections` that has an owner or rests; `id` gives an owner's datapath id.
    pub fn all(
        sections: &[crate::config::EgressConfig],
        blocks: &crate::egress::Blocks,
        now: std::time::Instant,
        id: impl Fn(IpAddr, IpAddr) -> Option<vip_common::BackendId>,
    ) -> Vec<Self> {
        let mut out = Vec::new();
        for e in sections {
            for block in 0..e.blocks() as u16 {
                let owner = e
                    .backends
                    .iter()
                    .find(|b| b.block == block)
                    .map(|b| b.address);
                let resting = blocks.resting(e.vip, block, now);
                if owner.is_none() && resting.is_none() {
                    continue;
                }
                let (first_port, last_port) = e.block_ports(block);
                out.push(Self {
                    vip: e.vip,
                    block,
                    first_port,
                    last_port,
                    owner,
                    state: match resting {
                        Some(_) => BlockState::Resting,
                        None => BlockState::Active,
                    },
                    previous: resting.map(|r| r.previous),
                    rest_left: resting.map(|r| r.until - now),
                    backend_id: owner.and_then(|o| id(e.vip, o)),
                });
            }
        }
        out
    }
}

impl std::fmt::Display for EgressBlockView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owner = self
            .owner
            .map_or_else(|| "nobody".to_string(), |o| o.to_string());
        write!(
            f,
            "egress {} block {} (ports {}-{}): {owner}",
            self.vip, self.block, self.first_port, self.last_port
        )?;
        if let (Some(previous), Some(left)) = (self.previous, self.rest_left) {
            write!(
                f,
                ", resting {:.0} s more since {previous} left",
                left.as_secs_f64().ceil()
            )?;
        }
        Ok(())
    }
}
