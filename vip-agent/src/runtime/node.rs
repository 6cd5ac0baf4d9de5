//! What runs on this node: the load balancer (datapath, applied state, next hops, health
//! checks) or a backend's decapsulation; loaded, attached and written to here.

use std::{collections::HashMap, net::IpAddr, time::Instant};

use anyhow::{Context, Result};
use aya::programs::XdpMode;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    apply::{Applied, ApplyError, ApplyReport, Capacity, Target},
    config::{AttachMode, Config, Role},
    dataplane::{Dataplane, DataplaneOptions, DecapPlane, log as datapath_log},
    egress,
    health::{Checker, Observation},
    net::{
        self,
        nat::{self, SourceNat},
        nexthop::{NextHop, Resolver},
    },
};

/// The load balancer: its datapath and what the agent knows it wrote there.
pub(crate) struct LbNode {
    pub(crate) dataplane: Dataplane,
    pub(crate) applied: Applied,
    resolver: Resolver,
    next_hops: HashMap<IpAddr, NextHop>,
    checker: Checker,
}

pub(crate) enum Node {
    Lb(Box<LbNode>),
    Backend(BackendNode),
}

/// A backend: its decapsulation program and the source NAT of its egress blocks.
pub(crate) struct BackendNode {
    decap: DecapPlane,
    /// The rules in vip's nf_tables table, as last written.
    source_nat: Vec<SourceNat>,
}

/// A loaded node and what loading found.
pub(crate) struct Loaded {
    pub(crate) node: Node,
    /// It took over a running datapath.
    pub(crate) restarted: bool,
    /// Health checks' results (load balancer only).
    pub(crate) observations: Option<mpsc::Receiver<Observation>>,
}

fn options(cfg: &Config, datapath_log: bool) -> DataplaneOptions {
    DataplaneOptions {
        table_size: cfg.node.table_size,
        table_slots: cfg.node.table_slots,
        conntrack_entries: cfg.node.conntrack_entries,
        max_vips: cfg.node.max_vips,
        max_backends: cfg.node.max_backends,
        pin_dir: Some(cfg.node.pin_dir.clone()),
        datapath_log,
    }
}

fn attach_modes(mode: AttachMode) -> &'static [XdpMode] {
    match mode {
        AttachMode::Native => &[XdpMode::Driver],
        AttachMode::Generic => &[XdpMode::Skb],
        AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
    }
}

/// Every backend address of `cfg` (of VIPs and egress blocks), once each.
fn backend_addresses(cfg: &Config) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = cfg
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address))
        .chain(
            cfg.egress
                .iter()
                .flat_map(|e| e.backends.iter().map(|b| b.address)),
        )
        .collect();
    v.sort();
    v.dedup();
    v
}

impl Node {
    /// Loads the node's program, reusing pinned maps and taking over what an earlier agent
    /// wrote into them; nothing is attached or written yet.
    pub(crate) async fn load(cfg: &Config, datapath_log: bool) -> Result<Loaded> {
        match cfg.node.role {
            Role::Lb => {
                let mut dataplane =
                    Dataplane::load(options(cfg, datapath_log)).context("loading the datapath")?;
                if let Some(log) = dataplane.start_log()? {
                    info!(target = datapath_log::TARGET, "datapath debug logs on");
                    tokio::spawn(async move {
                        if let Err(e) = datapath_log::forward(log).await {
                            warn!(error = %e, "datapath debug logs stopped");
                        }
                    });
                }
                let mut applied = Applied::new(Capacity::from(dataplane.options()));
                let adopted = applied.adopt(
                    &dataplane.vips().context("reading pinned VIPs")?,
                    &dataplane.backends().context("reading pinned backends")?,
                );
                if adopted > 0 {
                    info!(
                        entries = adopted,
                        "took over pinned state from an earlier agent"
                    );
                }
                let resolver = Resolver::new()?;
                let next_hops = resolver.resolve_all(&backend_addresses(cfg)).await?;
                let (checker, observations) = Checker::new();
                Ok(Loaded {
                    node: Node::Lb(Box::new(LbNode {
                        dataplane,
                        applied,
                        resolver,
                        next_hops,
                        checker,
                    })),
                    restarted: adopted > 0,
                    observations: Some(observations),
                })
            }
            Role::Backend => Ok(Loaded {
                node: Node::Backend(BackendNode {
                    decap: DecapPlane::load(Some(&cfg.node.pin_dir))
                        .context("loading the decapsulation program")?,
                    source_nat: Vec::new(),
                }),
                restarted: false,
                observations: None,
            }),
        }
    }

    /// Attaches the node's program to every configured interface; says how, per interface.
    pub(crate) fn attach(&mut self, cfg: &Config) -> Result<Vec<String>> {
        let mut attached = Vec::new();
        for iface in &cfg.node.interfaces {
            let modes = attach_modes(cfg.node.attach);
            let pin_dir = &cfg.node.pin_dir;
            let mode = match self {
                Node::Lb(lb) => {
                    net::enable_forwarding(iface)?;
                    lb.dataplane.attach_pinned(iface, modes, pin_dir)
                }
                Node::Backend(backend) => backend.decap.attach_pinned(iface, modes, pin_dir),
            }
            .with_context(|| format!("attaching XDP to {iface}"))?;
            let how = match mode {
                None => {
                    info!(%iface, "switched the running program to this one (no gap)");
                    "took over the running attachment"
                }
                Some(XdpMode::Skb) => {
                    warn!(%iface, "attached in generic mode: the driver has no native XDP");
                    "generic (skb) mode"
                }
                Some(mode) => {
                    info!(%iface, ?mode, "attached");
                    "driver mode"
                }
            };
            attached.push(format!("{iface}: {how}"));
        }
        Ok(attached)
    }
}

impl BackendNode {
    /// The decapsulation settings of `cfg`.
    pub(crate) fn configure(&mut self, cfg: &Config) -> Result<()> {
        let role = cfg
            .backend
            .as_ref()
            .context("backend role without [backend]")?;
        self.decap.set_local_addresses(&role.addresses)?;
        self.decap.set_vips(&role.vips)?;
        self.decap.set_gue_port(role.gue_port)?;
        info!(addresses = ?role.addresses, vips = ?role.vips, "decapsulation configured");
        Ok(())
    }

    /// Source NAT into this backend's egress blocks that do not rest at `now`; written only
    /// when the rules change.
    pub(crate) fn sync_source_nat(
        &mut self,
        cfg: &Config,
        blocks: &egress::Blocks,
        now: Instant,
    ) -> Result<()> {
        let own = cfg.backend.as_ref().map_or(&[][..], |b| &b.addresses[..]);
        let rules = egress::source_nat(&cfg.egress, own, blocks, now);
        if rules == self.source_nat {
            return Ok(());
        }
        nat::replace(&rules).context("writing the egress source NAT rules (nf_tables)")?;
        info!(rules = rules.len(), "egress source NAT");
        self.source_nat = rules;
        Ok(())
    }

    /// Removes the source NAT rules (on `--cleanup`).
    pub(crate) fn remove_source_nat(&mut self) -> Result<()> {
        if !self.source_nat.is_empty() {
            nat::replace(&[]).context("removing the egress source NAT rules")?;
            self.source_nat.clear();
        }
        Ok(())
    }
}

impl LbNode {
    /// Plans `target` against what is applied; nothing is written.
    pub(crate) fn plan(&self, target: &Target) -> Result<crate::apply::Plan, ApplyError> {
        Ok(self.applied.plan(target, &self.next_hops)?)
    }

    /// Writes a plan.
    pub(crate) fn execute(&mut self, plan: crate::apply::Plan) -> Result<ApplyReport, ApplyError> {
        self.applied.execute(plan, &mut self.dataplane)
    }

    /// Plans and writes `target`.
    pub(crate) fn write(&mut self, target: &Target) -> Result<ApplyReport, ApplyError> {
        let plan = self.plan(target)?;
        self.execute(plan)
    }

    /// Runs the health checks `cfg` asks for (and the program that carries data-path checks).
    pub(crate) fn sync_checks(&mut self, cfg: &Config) -> Result<()> {
        if cfg.has_datapath_checks() {
            for iface in &cfg.node.interfaces {
                net::accept_local(iface)?;
            }
            self.dataplane
                .attach_health_check_program()
                .context("attaching the data-path health check program to lo")?;
        }
        let applied = &self.applied;
        self.checker.sync(cfg, |key| applied.backend_id(key));
        Ok(())
    }

    /// Resolves every backend's next hop again; true if any changed.
    pub(crate) async fn resolve(&mut self, cfg: &Config) -> Result<bool> {
        let hops = self.resolver.resolve_all(&backend_addresses(cfg)).await?;
        let changed = hops != self.next_hops;
        self.next_hops = hops;
        Ok(changed)
    }
}
