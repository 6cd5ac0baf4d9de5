//! Commands run for the lab: `ip`, commands inside a namespace, sysctls.

use std::{fs, os::fd::AsRawFd, path::Path, process::Command};

use super::error::{LabError, Result, io};

/// Runs `ip ARGS`; its output, or an error naming the command (`what`) with its stderr.
pub(super) fn ip_checked(args: &[&str], what: impl Fn() -> String) -> Result<String> {
    let out = Command::new("ip").args(args).output().map_err(io(what()))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: what(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn ip(args: &[&str]) -> Result<()> {
    ip_checked(args, || format!("ip {}", args.join(" "))).map(drop)
}

pub(super) fn ip_out(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub(super) fn in_ns(ns: &str, cmd: &[&str]) -> Result<String> {
    let args: Vec<&str> = ["netns", "exec", ns].iter().chain(cmd).copied().collect();
    ip_checked(&args, || format!("[{ns}] {}", cmd.join(" ")))
}

pub(super) fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    in_ns(ns, &["sysctl", "-qw", &format!("{key}={value}")]).map(|_| ())
}

/// Moves the calling thread into network namespace `ns`.
/// Runs `f` on a thread inside namespace `ns` and returns its result; sockets it makes stay
/// in that namespace.
pub(super) fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns).unwrap_or_else(|e| panic!("entering {ns}: {e}"));
        f()
    })
    .join()
    .expect("a thread in a lab namespace")
}

pub fn enter(ns: &str) -> Result<()> {
    let file =
        fs::File::open(Path::new("/run/netns").join(ns)).map_err(io(format!("netns {ns}")))?;
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io(format!("setns {ns}"))(std::io::Error::last_os_error()));
    }
    Ok(())
}
