//! The datapath's debug log: aya-log records of `vip_lb_log` (see the eBPF crate's `log`
//! module), forwarded to `tracing` under the target [`TARGET`]. Asked for with
//! `vip-agent run --datapath-log`; without it the program's log path is pruned at load.

use std::io;

use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

/// The `tracing` target of datapath records (`RUST_LOG=vip::datapath=debug`).
pub const TARGET: &str = "vip::datapath";

/// Hands each aya-log record to `tracing`.
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        tracing::debug!(target: TARGET, "{}", record.args());
    }

    fn flush(&self) {}
}

/// The datapath's records as they come; an aya-log reader of the program's ring buffer.
pub type DatapathLog = EbpfLogger<ToTracing>;

/// Forwards records until the ring buffer fails; spawn it.
pub async fn forward(log: DatapathLog) -> io::Result<()> {
    // SAFETY: the logger owns its ring buffer's descriptor and keeps it open, unchanged, for as
    // long as it lives, and the `AsyncFd` owns the logger.
    let mut ring = unsafe { AsyncFd::register(log) }.map_err(io::Error::from)?;
    loop {
        let mut ready = ring.readable_mut().await?;
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}
