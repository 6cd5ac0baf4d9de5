//! The backend side: loading vip's decapsulation program and telling it which outer
//! destinations (this backend's addresses) and inner destinations (its VIPs) to accept.

use std::{collections::HashSet, net::IpAddr, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use vip_common::{
    AddrKey, DecapConfig, DecapStats,
    layout::{self, DECAP_LAYOUT},
};

use super::{
    attach::{attach_xdp_pinned, xdp_program},
    counters::sum_entry,
    error::{DataplaneError, Result, map_err},
    object,
    pins::{check_pinned, create_pin_dir},
};

/// The loaded decapsulation program and its maps.
pub struct DecapPlane {
    ebpf: Ebpf,
}

impl DecapPlane {
    /// Loads the embedded `vip-decap` object, reusing maps pinned under `pin_dir` if given.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            create_pin_dir(dir)?;
            for l in DECAP_LAYOUT.iter() {
                let path = dir.join(l.name);
                if path.exists() {
                    check_pinned(&path, l.name, &DECAP_LAYOUT, l.max_entries)?;
                }
                loader.map_pin_path(l.name, path);
            }
        }
        let ebpf = loader.load(object::decap()).map_err(DataplaneError::Load)?;
        Ok(Self { ebpf })
    }

    /// The XDP program, verified on first use.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        xdp_program(&mut self.ebpf, layout::DECAP_PROGRAM)
    }

    /// Attaches to `iface` with a pinned link (see [`attach_xdp_pinned`]).
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        modes: &[XdpMode],
        pin_dir: &Path,
    ) -> Result<Option<XdpMode>> {
        let prog = self.program()?;
        attach_xdp_pinned(prog, layout::DECAP_PROGRAM, iface, modes, pin_dir)
    }

    /// Sets the outer destinations to accept: exactly `addrs`.
    pub fn set_local_addresses(&mut self, addrs: &[IpAddr]) -> Result<()> {
        self.replace_set(layout::DECAP_LOCAL, addrs)
    }

    /// Sets the VIPs (inner destinations) to accept: exactly `addrs`.
    pub fn set_vips(&mut self, addrs: &[IpAddr]) -> Result<()> {
        self.replace_set(layout::DECAP_VIPS, addrs)
    }

    /// Makes the address set in `name` equal to `addrs`: adds before it removes, so an address
    /// in both the old and the new set is never missing.
    fn replace_set(&mut self, name: &'static str, addrs: &[IpAddr]) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let mut set: HashMap<&mut MapData, AddrKey, u32> =
            HashMap::try_from(map).map_err(map_err(name))?;
        let wanted: HashSet<AddrKey> = addrs.iter().map(|a| AddrKey::new(*a)).collect();
        for key in &wanted {
            set.insert(key, 1, 0).map_err(map_err(name))?;
        }
        let stale: Vec<AddrKey> = set
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            set.remove(&key).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Decapsulates GUE on this UDP port too (`None`: IP-in-IP only).
    pub fn set_gue_port(&mut self, port: Option<u16>) -> Result<()> {
        let name = layout::DECAP_CONFIG;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let mut config: Array<&mut MapData, DecapConfig> =
            Array::try_from(map).map_err(map_err(name))?;
        let value = DecapConfig {
            gue_port: port.unwrap_or(0).to_be_bytes(),
            _pad: [0; 2],
        };
        config.set(0, value, 0).map_err(map_err(name))
    }

    /// Counters, summed over CPUs.
    pub fn stats(&self) -> Result<DecapStats> {
        let name = layout::DECAP_STATS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let map: PerCpuArray<&MapData, DecapStats> =
            PerCpuArray::try_from(map).map_err(map_err(name))?;
        sum_entry(&map, name, 0)
    }
}
