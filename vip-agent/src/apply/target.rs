//! What the maps should hold: the config's VIPs with each backend's table weight and presence
//! now (health and drains decided by the caller).

use std::net::IpAddr;

use vip_common::VipKey;

use super::encode::Sources;
use crate::config::{BackendConfig, Config, EgressConfig, VipConfig};

/// One backend of one VIP: the unit of ids, table membership, health and drain.
pub type BackendKey = (VipKey, IpAddr);

/// What the maps should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub sources: Sources,
    /// New conntrack entries per second and CPU (0: no limit).
    pub insert_limit: u32,
    pub vips: Vec<VipTarget>,
    pub egress: Vec<EgressTarget>,
}

impl Target {
    /// The target for `config`, each backend's table weight and presence given by `backend`,
    /// and whether an egress block rests (its backend left lately) by `resting`.
    pub fn new(
        config: &Config,
        backend: impl Fn(&BackendKey, &BackendConfig) -> BackendTarget,
        resting: impl Fn(&EgressConfig, u16) -> bool,
    ) -> Self {
        Target {
            sources: Sources {
                v4: config.node.source_v4,
                v6: config.node.source_v6,
            },
            insert_limit: config.node.conntrack_insert_limit,
            vips: config
                .vips
                .iter()
                .map(|vip| VipTarget {
                    config: vip.clone(),
                    backends: vip
                        .backends
                        .iter()
                        .map(|b| backend(&(vip.key(), b.address), b))
                        .collect(),
                })
                .collect(),
            egress: config
                .egress
                .iter()
                .filter_map(|egress| {
                    // Validation made sure that an LB node has a VIP on every egress address.
                    let vip = config.vips.iter().find(|v| v.address == egress.vip)?;
                    let mut owners = vec![None; egress.blocks() as usize];
                    for b in &egress.backends {
                        if !resting(egress, b.block) {
                            owners[usize::from(b.block)] = Some(b.address);
                        }
                    }
                    Some(EgressTarget {
                        vip: vip.clone(),
                        config: egress.clone(),
                        owners,
                    })
                })
                .collect(),
        }
    }

    /// The target for `config` as written: every backend up, undrained, no block resting.
    pub fn configured(config: &Config) -> Self {
        Self::new(
            config,
            |_, b| BackendTarget {
                address: b.address,
                weight: b.table_weight(),
                present: true,
            },
            |_, _| false,
        )
    }
}

/// An egress address as the maps should hold it: its owner table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressTarget {
    /// The VIP on that address whose encapsulation replies take (the config's first).
    pub vip: VipConfig,
    pub config: EgressConfig,
    /// The owner of each block now; `None` for a free or resting block.
    pub owners: Vec<Option<IpAddr>>,
}

/// A VIP as the maps should hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipTarget {
    pub config: VipConfig,
    /// Its backends, in the config's order.
    pub backends: Vec<BackendTarget>,
}

/// A backend as the maps should hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendTarget {
    pub address: IpAddr,
    /// Weight in the Maglev table now; 0: no new flows.
    pub weight: u32,
    /// Whether its entry is present: false (down) moves its established flows too.
    pub present: bool,
}
