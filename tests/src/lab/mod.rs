//! The vip lab in network namespaces, as the product is deployed:
//!
//! ```text
//!                         ┌── lb1 (vip-agent: XDP on eth0, BGP AS 65001) ──┐
//!  client ── router ──────┤                                                │ (encapsulated,
//!   (ECMP, BIRD AS 65000) └── lb2 (vip-agent: XDP on eth0, BGP AS 65001) ──┘  back via router)
//!      │
//!      ├── be1 ─┐  vip-agent backend role: decapsulation, VIPs on lo, TCP and UDP services;
//!      ├── be2  ├  replies go straight back to the client (DSR)
//!      └── be3 ─┘
//! ```
//!
//! The router learns the VIPs only from the LB nodes' BGP announcements, installs them with
//! ECMP (`merge paths on`, L4 multipath hashing), and spreads client flows over the LB nodes.
//! Every name carries the lab's prefix, so [`down`] removes everything by name, also after a
//! crash. Lab-only ranges: 198.18.0.0/15, fd00::/8.

mod daemons;
mod error;
mod measure;
mod services;
mod shell;
mod topology;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

pub use error::{LabError, Result};
pub use services::{
    echo_all, egress_ping, egress_tcp, egress_udp, serve, serve_outside, tcp_hello, udp_hello,
};
pub use shell::enter;
pub use topology::backend_addrs;

use error::io;
use shell::{ip, ip_out};

pub const VIP4: &str = "198.19.0.1";

pub const VIP6: &str = "fd00:19::1";

pub const TCP_PORT: u16 = 80;

pub const UDP_PORT: u16 = 53;

/// MTU of the lab's links; the client's own link is set back to 1500.
const LINK_MTU: u32 = 1600;

/// iperf3's port: a VIP for throughput measurements (`cargo xtask bench`).
pub const IPERF_PORT: u16 = 5201;

const ROUTER_ASN: u32 = 65000;

const LB_ASN: u32 = 65001;

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Names of namespaces, pin directories and files start with this.
    pub prefix: String,
    pub lbs: usize,
    /// Weight of each backend (one entry per backend); 0 leaves the backend out of the LB
    /// nodes' config (removed, not draining).
    pub weights: Vec<u32>,
    /// Encapsulate with GUE (port [`GUE_PORT`]) instead of IP-in-IP.
    pub gue: bool,
    /// A `[vip.health]` table for every VIP, e.g. `check = "tcp"`.
    pub health: Option<String>,
    /// BFD between the router and the LB nodes at this interval (ms, both ways, x 3).
    pub bfd: Option<u64>,
    /// Both VIP addresses as the backends' source too: `[[egress]]` on every node with ports
    /// [`EGRESS_PORTS`] in blocks of this size, backend `i` (weight > 0) owning block `i - 1`.
    pub egress_block_size: Option<u16>,
    /// Flow-state sharing between the LB nodes (`[sync]`, refresh every 5 s), all with the
    /// tier's key except the node `sync_wrong_key`, which has another, and the node
    /// `sync_without`, which has no `[sync]` at all.
    pub sync: bool,
    pub sync_wrong_key: Option<usize>,
    pub sync_without: Option<usize>,
    /// `[sync] fetch_timeout` in seconds; `None`: the agent's default.
    pub sync_fetch_timeout: Option<u64>,
    /// Backends (1-based) whose `state` is "draining" in the LB nodes' config.
    pub drained: Vec<usize>,
}

/// Flow-state sharing's port on the LB nodes.
pub const SYNC_PORT: u16 = 7180;

/// The lab's egress ports (on both VIP addresses).
pub const EGRESS_PORTS: (u16, u16) = (40_000, 40_999);
/// The lab's egress block rest, in seconds: short, for tests to see one end.
pub const EGRESS_REST_SECS: u64 = 3;

/// The lab's GUE port.
pub const GUE_PORT: u16 = 6080;

impl LabSpec {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            lbs: 2,
            weights: vec![1, 1, 1],
            gue: false,
            health: None,
            bfd: None,
            egress_block_size: None,
            sync: false,
            sync_wrong_key: None,
            sync_without: None,
            sync_fetch_timeout: None,
            drained: Vec::new(),
        }
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn pin_dir(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-{name}", self.prefix))
    }

    fn run_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/{}", self.prefix))
    }

    /// The control socket of node `name`'s agent.
    fn control_socket(&self, name: &str) -> PathBuf {
        self.run_dir().join(format!("{name}.sock"))
    }

    pub fn backends(&self) -> usize {
        self.weights.len()
    }
}

/// The running lab. Dropping it tears everything down, unless [`Lab::keep`] was called.
pub struct Lab {
    pub spec: LabSpec,
    agent: PathBuf,
    /// The program that runs the backends' services (`serve`).
    services: PathBuf,
    /// Processes by node or service name.
    children: Vec<(String, Child)>,
    keep: bool,
}

impl Lab {
    /// [`Lab::up`] with this workspace's release builds: the agent, the decapsulation object and
    /// `vip-demo` (which also serves the backends' services).
    pub fn up_built(spec: LabSpec) -> Result<Self> {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        Self::up(
            spec,
            &crate::node::agent_bin(),
            &target.join("bpfel-unknown-none/release/vip-decap"),
            &target.join("release/vip-demo"),
        )
    }

    /// Builds the topology, starts BIRD, the agents and the services, and waits until the
    /// router has the VIPs with one next hop per LB node.
    pub fn up(spec: LabSpec, agent: &Path, decap_object: &Path, services: &Path) -> Result<Self> {
        down(&spec.prefix)?;
        let mut lab = Self {
            spec,
            agent: agent.to_owned(),
            services: services.to_owned(),
            children: Vec::new(),
            keep: false,
        };
        fs::create_dir_all(lab.spec.run_dir())
            .map_err(io(format!("creating {}", lab.spec.run_dir().display())))?;
        for (name, key) in [
            ("sync.key", "the lab tier's flow-state key\n"),
            ("sync-other.key", "a key of another tier entirely\n"),
        ] {
            let path = lab.spec.run_dir().join(name);
            fs::write(&path, key).map_err(io(format!("writing {}", path.display())))?;
        }
        lab.topology(decap_object)?;
        lab.start_bird()?;
        for i in 1..=lab.spec.backends() {
            let name = format!("be{i}");
            lab.start_agent(&name, &lab.backend_config(i))?;
            lab.start_service(i)?;
        }
        for i in 1..=lab.spec.lbs {
            lab.start_agent(&format!("lb{i}"), &lab.lb_config(i))?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while lab.router_next_hops(VIP4) < lab.spec.lbs || lab.router_next_hops(VIP6) < lab.spec.lbs
        {
            if Instant::now() > deadline {
                return Err(LabError::NotReached(format!(
                    "the router did not learn the VIPs from every LB node: {}\nagent logs in {}",
                    lab.router_route(VIP4),
                    lab.spec.run_dir().display()
                )));
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(lab)
    }

    /// Leaves the lab running when this handle drops (`lab up`); `down` removes it by name.
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// For a failed test: the last warnings and errors of each agent, which go with the lab's
    /// run directory otherwise.
    fn print_agent_warnings(&self) {
        const LINES: usize = 20;
        for (name, _) in &self.children {
            if !(name.starts_with("lb") || name.starts_with("be")) {
                continue;
            }
            let log = self.agent_log(name);
            let warnings: Vec<&str> = log
                .lines()
                .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                .collect();
            for line in &warnings[warnings.len().saturating_sub(LINES)..] {
                eprintln!("{name}: {line}");
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if thread::panicking() {
            self.print_agent_warnings();
        }
        // Agents first (SIGTERM: they run with --cleanup), then everything else.
        for (name, child) in &mut self.children {
            if name.starts_with("lb") || name.starts_with("be") {
                // SAFETY: signalling our own child by pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = down(&self.spec.prefix) {
            eprintln!("lab teardown: {e}");
        }
    }
}

/// Removes everything a lab with `prefix` made, by name: processes, namespaces, pins, files.
/// Safe to run at any time.
pub fn down(prefix: &str) -> Result<()> {
    let run_dir = format!("/run/{prefix}");
    // Agents, services and BIRD of a crashed run, by their config or namespace names.
    for pattern in [format!("{run_dir}/"), format!("--netns {prefix}-")] {
        let _ = Command::new("pkill")
            .args(["-f", "--", &pattern])
            .stderr(Stdio::null())
            .status();
    }
    let list = ip_out(&["netns", "list"]);
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&format!("{prefix}-")) {
            ip(&["netns", "del", name])?;
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{prefix}-"))
            {
                fs::remove_dir_all(entry.path())
                    .map_err(io(format!("removing {}", entry.path().display())))?;
            }
        }
    }
    let _ = fs::remove_dir_all(&run_dir);
    Ok(())
}

/// What the lab has running: namespaces, processes, the router's VIP routes.
pub fn status(prefix: &str) -> String {
    let mut out = String::new();
    let list = ip_out(&["netns", "list"]);
    let names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    if names.is_empty() {
        return format!("no lab with prefix {prefix} is up\n");
    }
    out += &format!("namespaces: {}\n", names.join(" "));
    let router = format!("{prefix}-router");
    for vip in [VIP4, VIP6] {
        let family = if vip.contains(':') { "-6" } else { "-4" };
        out += &format!(
            "router route to {vip}: {}\n",
            ip_out(&["-n", &router, family, "route", "show", vip]).trim()
        );
    }
    out
}
