//! What the maps should hold: the config's VIPs with each backend's table weight and presence
//! now (health and drains decided by the caller).

use std::net::IpAddr;

use vip_common::VipKey;

use super::encode::Sources;
use crate::config::{BackendConfig, Config, VipConfig};

/// One backend of one VIP: the unit of ids, table membership, health and drain.
pub type BackendKey = (VipKey, IpAddr);

/// What the maps should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub sources: Sources,
    /// New conntrack entries per second and CPU (0: no limit).
    pub insert_limit: u32,
    pub vips: Vec<VipTarget>,
}

impl Target {
    /// The target for `config`, each backend's table weight and presence given by `backend`.
    pub fn new(
        config: &Config,
        backend: impl Fn(&BackendKey, &BackendConfig) -> BackendTarget,
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
        }
    }

    /// The target for `config` as written: every backend up, undrained.
    pub fn configured(config: &Config) -> Self {
        Self::new(config, |_, b| BackendTarget {
            address: b.address,
            weight: b.table_weight(),
            present: true,
        })
    }
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
