//! The node's network as the agent sees and changes it: next hops toward backends, VIP
//! addresses on `lo`, egress source NAT, socket options, and the interface settings the datapath needs.

pub mod lo;
pub mod nat;
pub mod nexthop;
pub mod routes;
pub(crate) mod sockopt;

use tracing::info;

/// Why an interface setting could not be made.
#[derive(Debug, thiserror::Error)]
#[error("setting {knob}")]
pub struct SysctlError {
    knob: String,
    #[source]
    source: std::io::Error,
}

/// Sets `knob` (a path under /proc/sys) to `value` unless it has it; true if it changed.
fn ensure(knob: String, value: &str) -> Result<bool, SysctlError> {
    if std::fs::read_to_string(&knob).is_ok_and(|v| v.trim() == value) {
        return Ok(false);
    }
    std::fs::write(&knob, value).map_err(|source| SysctlError { knob, source })?;
    Ok(true)
}

/// bpf_fib_lookup answers only on interfaces that forward, and packets the datapath passes to
/// the stack for neighbour resolution are forwarded by it: an LB uplink must forward.
pub fn enable_forwarding(iface: &str) -> Result<(), SysctlError> {
    for family in ["ipv4", "ipv6"] {
        let knob = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
        if ensure(knob.clone(), "1")? {
            info!(%knob, "enabled forwarding");
        }
    }
    Ok(())
}

/// Data-path health checks: the backend answers the probe from the VIP, which is also on this
/// node's `lo`. IPv4 drops such packets as martians unless the uplink accepts local sources.
pub fn accept_local(iface: &str) -> Result<(), SysctlError> {
    let knob = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    if ensure(knob.clone(), "1")? {
        info!(%knob, "enabled for data-path health checks");
    }
    Ok(())
}
