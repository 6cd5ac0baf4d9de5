//! Attaching programs so they outlive the agent (pinned links), loading them (with the
//! verifier's retry), and removing everything vip left on a node.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use vip_common::layout::{DECAP_LAYOUT, LAYOUT, OBSOLETE_PINS};

use super::error::{DataplaneError, Result};

/// Attaches `prog` to `iface`, trying `modes` in order, so that the attachment survives the
/// agent: the XDP link is pinned at `<pin_dir>/links/xdp_<iface>`. If that pin exists (a running
/// datapath from an earlier agent), the link is switched to `prog` atomically, with no packet
/// unhandled. Returns the mode used, or `None` when an existing link was switched.
pub fn attach_xdp_pinned(
    prog: &mut Xdp,
    program: &'static str,
    iface: &str,
    modes: &[XdpMode],
    pin_dir: &Path,
) -> Result<Option<XdpMode>> {
    let link_path = link_pin_path(pin_dir, iface);
    let program_err = |source| DataplaneError::Program { program, source };
    let link_err = |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Link {
        path: link_path.clone(),
        source,
    };
    if link_path.exists() {
        let pinned = PinnedLink::from_pin(&link_path).map_err(|e| link_err(e.into()))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| link_err(e.into()))?;
        prog.attach_to_link(link).map_err(program_err)?;
        return Ok(None);
    }
    let mut last_err = None;
    for &mode in modes {
        match prog.attach(iface, mode) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(program_err)?;
                // Fails if aya had to fall back to netlink: that kernel cannot keep XDP
                // attached across agent restarts.
                let fd_link = FdLink::try_from(link).map_err(|e| link_err(e.into()))?;
                std::fs::create_dir_all(link_path.parent().expect("has a parent"))
                    .map_err(|e| link_err(e.into()))?;
                fd_link.pin(&link_path).map_err(|e| link_err(e.into()))?;
                return Ok(Some(mode));
            }
            Err(e) => {
                tracing::warn!(%iface, ?mode, error = %e, "XDP attach failed");
                last_err = Some(e);
            }
        }
    }
    let error = last_err.expect("at least one attach mode");
    if held_by_another_program(&error) {
        return Err(DataplaneError::InterfaceTaken {
            iface: iface.to_owned(),
            source: error,
        });
    }
    Err(program_err(error))
}

/// Whether an attach failed because another XDP program holds the interface (EBUSY, EEXIST).
fn held_by_another_program(error: &ProgramError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EBUSY | libc::EEXIST))
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Loads a program, again when the verifier was interrupted: it gives up with EAGAIN when a
/// signal arrives while it works (as libbpf does, up to five attempts).
pub(crate) fn load_retrying(
    mut load: impl FnMut() -> std::result::Result<(), ProgramError>,
) -> std::result::Result<(), ProgramError> {
    let mut attempts = 5;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempts > 1 =>
            {
                attempts -= 1;
            }
            other => return other,
        }
    }
}

/// The XDP program `name` of `ebpf`, loaded (verified) on first use.
pub(crate) fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    let program_err = |source| DataplaneError::Program {
        program: name,
        source,
    };
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(program_err)?;
    if prog.fd().is_err() {
        load_retrying(|| prog.load()).map_err(program_err)?;
    }
    Ok(prog)
}

/// Where the XDP link of `iface` is pinned.
pub fn link_pin_path(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("xdp_{iface}"))
}

/// Removes vip from the node: unpins every XDP link under `pin_dir` (which detaches the
/// program) and every map pin. Returns the interfaces detached.
pub fn detach_all(pin_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut detached = Vec::new();
    let links = pin_dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            std::fs::remove_file(entry.path())?;
            detached.push(name.trim_start_matches("xdp_").to_owned());
        }
        std::fs::remove_dir(&links)?;
    }
    let names = LAYOUT.iter().chain(DECAP_LAYOUT.iter()).map(|l| l.name);
    for name in names.chain(OBSOLETE_PINS) {
        match std::fs::remove_file(pin_dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(detached),
    }
}
