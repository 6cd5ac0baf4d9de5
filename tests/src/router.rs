//! Real routing daemons in a namespace, for the BGP tests: BIRD 2, GoBGP and FRR.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::node::Netns;

/// Polls `ok` for up to 20 s; on timeout panics with `what` and the daemon's view.
fn poll(ok: impl Fn() -> bool, what: &str, view: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            view()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// `bird` in the foreground in namespace `ns`, with its config and control socket.
pub fn spawn_bird(ns: &str, conf: &Path, socket: &Path) -> std::io::Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", ns, "bird", "-f", "-c"])
        .arg(conf)
        .arg("-s")
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// A BIRD daemon in `ns`, stopped on drop.
pub struct Bird {
    child: Child,
    socket: PathBuf,
    pub ns: String,
}

impl Bird {
    /// Starts `bird` in the foreground with `config` (a `log` line is added).
    pub fn start(ns: &Netns, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-bird", ns.name));
        fs::create_dir_all(&dir).expect("bird dir");
        let conf = dir.join("bird.conf");
        let socket = dir.join("bird.ctl");
        fs::write(
            &conf,
            format!("log \"{}\" all;\n{config}", dir.join("bird.log").display()),
        )
        .expect("write bird.conf");
        let child = spawn_bird(&ns.name, &conf, &socket)
            .expect("start bird (bird2 is installed by `cargo xtask setup`)");
        let bird = Self {
            child,
            socket,
            ns: ns.name.clone(),
        };
        bird.wait_for(
            |b| b.cli("show status").contains("Daemon is up"),
            "BIRD to start",
        );
        bird
    }

    /// `birdc -s SOCKET COMMAND`.
    pub fn cli(&self, command: &str) -> String {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(command.split_whitespace())
            .output()
            .expect("birdc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `ok` for up to 20 s.
    pub fn wait_for(&self, ok: impl Fn(&Self) -> bool, what: &str) {
        poll(|| ok(self), what, || self.cli("show protocols all"));
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.stop();
        // Its config, log and control socket.
        if let Some(dir) = self.socket.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// A GoBGP daemon in `ns`, stopped on drop.
pub struct GoBgp {
    child: Child,
    ns: String,
    /// Its config and log.
    dir: PathBuf,
}

impl GoBgp {
    pub fn start(ns: &Netns, config_toml: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-gobgp", ns.name));
        fs::create_dir_all(&dir).expect("gobgp dir");
        let conf = dir.join("gobgpd.toml");
        fs::write(&conf, config_toml).expect("write gobgpd.toml");
        let log = fs::File::create(dir.join("gobgpd.log")).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "gobgpd", "-t", "toml", "-f"])
            .arg(&conf)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start gobgpd (installed by `cargo xtask setup`)");
        let g = Self {
            child,
            ns: ns.name.clone(),
            dir,
        };
        g.wait_for(|g| g.cli("global").contains("AS"), "gobgpd to start");
        g
    }

    /// `gobgp ARGS` against this daemon's API (inside its namespace).
    pub fn cli(&self, args: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "gobgp"])
            .args(args.split_whitespace())
            .output()
            .expect("gobgp");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn wait_for(&self, ok: impl Fn(&Self) -> bool, what: &str) {
        poll(|| ok(self), what, || self.cli("neighbor"));
    }
}

impl Drop for GoBgp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// FRR's bgpd in `ns` (without zebra: nothing is installed in the kernel), its own config and
/// vty socket directory, stopped on drop.
pub struct Frr {
    child: Child,
    /// Its config, pid file, vty socket and log.
    dir: PathBuf,
}

impl Frr {
    /// Starts `bgpd` with `config` (FRR's `bgpd.conf` syntax).
    pub fn start(ns: &Netns, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-frr", ns.name));
        fs::create_dir_all(&dir).expect("frr dir");
        let conf = dir.join("bgpd.conf");
        fs::write(&conf, config).expect("write bgpd.conf");
        let log = fs::File::create(dir.join("bgpd.log")).expect("log");
        // -S: stay root (no frr user or vty group needed); -Z: no zebra.
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "/usr/lib/frr/bgpd",
                "-S",
                "-Z",
                "-f",
            ])
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("bgpd.pid"))
            .arg("--vty_socket")
            .arg(&dir)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start bgpd (frr is installed by `cargo xtask setup`)");
        let frr = Self { child, dir };
        frr.wait_for(
            |f| f.cli("show bgp summary").contains("BGP router identifier"),
            "bgpd to start",
        );
        frr
    }

    /// `vtysh -c COMMAND` against this daemon.
    pub fn cli(&self, command: &str) -> String {
        let out = Command::new("vtysh")
            .arg("--vty_socket")
            .arg(&self.dir)
            .args(["-c", command])
            .output()
            .expect("vtysh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn wait_for(&self, ok: impl Fn(&Self) -> bool, what: &str) {
        poll(|| ok(self), what, || self.cli("show bgp neighbors"));
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
