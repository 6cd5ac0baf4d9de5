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

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

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

type Result<T> = std::result::Result<T, String>;

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
}

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

/// Runs `ip ARGS`; its output, or an error naming the command (`what`) with its stderr.
fn ip_checked(args: &[&str], what: impl Fn() -> String) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", what()))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            what(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    ip_checked(args, || format!("ip {}", args.join(" "))).map(drop)
}

fn ip_out(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn in_ns(ns: &str, cmd: &[&str]) -> Result<String> {
    let args: Vec<&str> = ["netns", "exec", ns].iter().chain(cmd).copied().collect();
    ip_checked(&args, || format!("[{ns}] {}", cmd.join(" ")))
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    in_ns(ns, &["sysctl", "-qw", &format!("{key}={value}")]).map(|_| ())
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter(ns: &str) -> Result<()> {
    let file =
        fs::File::open(Path::new("/run/netns").join(ns)).map_err(|e| format!("netns {ns}: {e}"))?;
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A veth between two namespaces, both ends up, addressed.
fn link(
    a: &str,
    a_dev: &str,
    a_addrs: &[String],
    b: &str,
    b_dev: &str,
    b_addrs: &[String],
) -> Result<()> {
    ip(&[
        "link", "add", a_dev, "netns", a, "type", "veth", "peer", "name", b_dev, "netns", b,
    ])?;
    // Encapsulated packets are 20-48 bytes longer than the client's: the links inside the "data
    // centre" have room for them (the client's link stays at 1500).
    for (n, dev) in [(a, a_dev), (b, b_dev)] {
        ip(&["-n", n, "link", "set", dev, "mtu", &LINK_MTU.to_string()])?;
    }
    for (n, dev, addrs) in [(a, a_dev, a_addrs), (b, b_dev, b_addrs)] {
        for addr in addrs {
            ip(&["-n", n, "addr", "add", addr, "dev", dev, "nodad"])?;
        }
        ip(&["-n", n, "link", "set", dev, "up"])?;
    }
    Ok(())
}

fn default_routes(n: &str, v4: &str, v6: &str) -> Result<()> {
    ip(&["-n", n, "route", "add", "default", "via", v4])?;
    ip(&["-n", n, "-6", "route", "add", "default", "via", v6])
}

/// LB node `i` (1-based): its address and the router's on their link.
fn lb_addrs(i: usize) -> (String, String, String, String) {
    (
        format!("198.18.{}.2", 1 + i),
        format!("198.18.{}.1", 1 + i),
        format!("fd00:18:{}::2", 1 + i),
        format!("fd00:18:{}::1", 1 + i),
    )
}

/// The number `field` in the object `section` near the end of iperf3's JSON report.
fn json_number(json: &str, section: &str, field: &str) -> Result<f64> {
    let at = json
        .rfind(&format!("\"{section}\""))
        .ok_or(format!("no {section} in iperf3 output"))?;
    json[at..]
        .split(&format!("\"{field}\":"))
        .nth(1)
        .and_then(|v| v.split([',', '}', '\n']).next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or(format!("no {section}.{field} in iperf3 output"))
}

/// Backend `i` (1-based): IPv4 and IPv6 addresses.
pub fn backend_addrs(i: usize) -> (String, String) {
    (
        format!("198.18.{}.2", 10 + i),
        format!("fd00:18:{}::2", 10 + i),
    )
}

/// The running lab. Dropping it tears everything down, unless [`Lab::keep`] was called.
pub struct Lab {
    pub spec: LabSpec,
    agent: PathBuf,
    /// The program that runs the backends' services (`serve`).
    services: PathBuf,
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
        fs::create_dir_all(lab.spec.run_dir()).map_err(|e| e.to_string())?;
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
                return Err(format!(
                    "the router did not learn the VIPs from every LB node: {}\nagent logs in {}",
                    lab.router_route(VIP4),
                    lab.spec.run_dir().display()
                ));
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(lab)
    }

    /// Leaves the lab running when this handle drops (`lab up`); `down` removes it by name.
    pub fn keep(mut self) {
        self.keep = true;
    }

    fn topology(&self, decap_object: &Path) -> Result<()> {
        let s = &self.spec;
        let mut names: Vec<String> = vec!["client".into(), "router".into()];
        names.extend((1..=s.lbs).map(|i| format!("lb{i}")));
        names.extend((1..=s.backends()).map(|i| format!("be{i}")));
        for n in &names {
            ip(&["netns", "add", &s.ns(n)])?;
            ip(&["-n", &s.ns(n), "link", "set", "lo", "up"])?;
        }
        let (client, router) = (s.ns("client"), s.ns("router"));
        link(
            &client,
            "eth0",
            &["198.18.0.10/24".into(), "fd00:18::10/64".into()],
            &router,
            "r-client",
            &["198.18.0.1/24".into(), "fd00:18::1/64".into()],
        )?;
        default_routes(&client, "198.18.0.1", "fd00:18::1")?;
        // Keep each flow on its path: TCP would re-hash (and so change LB node) after every
        // retransmission timeout otherwise, which hides what failover does.
        sysctl(&client, "net.core.txrehash", "0")?;
        // The client's network has an ordinary MTU.
        ip(&["-n", &client, "link", "set", "eth0", "mtu", "1500"])?;
        ip(&["-n", &router, "link", "set", "r-client", "mtu", "1500"])?;
        // Full checksums from the client (veth offload would leave them to "hardware").
        in_ns(&client, &["ethtool", "-K", "eth0", "tx", "off"])?;
        for i in 1..=s.lbs {
            let lb = s.ns(&format!("lb{i}"));
            let (a4, r4, a6, r6) = lb_addrs(i);
            let r_dev = format!("r-lb{i}");
            link(
                &lb,
                "eth0",
                &[format!("{a4}/24"), format!("{a6}/64")],
                &router,
                &r_dev,
                &[format!("{r4}/24"), format!("{r6}/64")],
            )?;
            default_routes(&lb, &r4, &r6)?;
            // XDP_TX out of a veth reaches the peer only if the peer runs an XDP program:
            // vip's decap program with empty maps passes everything.
            let obj = decap_object.to_string_lossy().into_owned();
            ip(&[
                "-n", &router, "link", "set", "dev", &r_dev, "xdpdrv", "obj", &obj, "sec", "xdp",
            ])?;
        }
        for i in 1..=s.backends() {
            let be = s.ns(&format!("be{i}"));
            let (b4, b6) = backend_addrs(i);
            link(
                &be,
                "eth0",
                &[format!("{b4}/24"), format!("{b6}/64")],
                &router,
                &format!("r-be{i}"),
                &[
                    format!("198.18.{}.1/24", 10 + i),
                    format!("fd00:18:{}::1/64", 10 + i),
                ],
            )?;
            default_routes(
                &be,
                &format!("198.18.{}.1", 10 + i),
                &format!("fd00:18:{}::1", 10 + i),
            )?;
            // DSR: the client's packet arrives on eth0 while the VIP sits on lo.
            sysctl(&be, "net.ipv4.conf.all.rp_filter", "0")?;
            sysctl(&be, "net.ipv4.conf.eth0.rp_filter", "0")?;
            sysctl(&be, "net.ipv4.conf.all.arp_ignore", "1")?;
            sysctl(&be, "net.ipv4.conf.all.arp_announce", "2")?;
        }
        sysctl(&router, "net.ipv4.ip_forward", "1")?;
        sysctl(&router, "net.ipv6.conf.all.forwarding", "1")?;
        // ECMP on L4 hashes, both families.
        sysctl(&router, "net.ipv4.fib_multipath_hash_policy", "1")?;
        sysctl(&router, "net.ipv6.fib_multipath_hash_policy", "1")?;
        // Replies from backends carry the VIP as source; the VIP is routed toward the LBs.
        sysctl(&router, "net.ipv4.conf.all.rp_filter", "0")?;
        // `kill_lb` makes a node vanish with `ip rule ... blackhole` on the router. For that rule
        // to catch packets to the router itself (BIRD's sessions), it must come before the
        // `local` table, and established sockets must not skip the FIB (early demux).
        for family in ["-4", "-6"] {
            ip(&[
                "-n", &router, family, "rule", "add", "pref", "100", "lookup", "local",
            ])?;
            ip(&["-n", &router, family, "rule", "del", "pref", "0"])?;
        }
        sysctl(&router, "net.ipv4.ip_early_demux", "0")?;
        sysctl(&router, "net.ipv4.tcp_early_demux", "0")?;
        Ok(())
    }

    fn start_bird(&mut self) -> Result<()> {
        let s = &self.spec;
        let dir = s.run_dir();
        let mut conf = format!(
            "log \"{}\" all;\nrouter id 198.18.0.1;\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ export all; }}; merge paths on; persist; }}\n\
             protocol kernel {{ ipv6 {{ export all; }}; merge paths on; persist; }}\n",
            dir.join("bird.log").display()
        );
        for i in 1..=s.lbs {
            let (a4, r4, _, _) = lb_addrs(i);
            conf += &format!(
                "protocol bgp lb{i} {{ local {r4} as {ROUTER_ASN}; neighbor {a4} as {LB_ASN}; \
                 hold time 3; connect retry time 1; error wait time 1, 2; \
                 ipv4 {{ import all; export none; }}; ipv6 {{ import all; export none; }}; }}\n"
            );
        }
        let conf_path = dir.join("bird.conf");
        fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let socket = dir.join("bird.ctl");
        let bird = crate::router::spawn_bird(&s.ns("router"), &conf_path, &socket)
            .map_err(|e| format!("starting bird: {e}"))?;
        self.children.push(("bird".into(), bird));
        Ok(())
    }

    /// Starts backend `i`'s services.
    pub fn start_service(&mut self, i: usize) -> Result<()> {
        let name = format!("be{i}");
        let ns = self.spec.ns(&name);
        let (b4, _) = backend_addrs(i);
        let program = self.services.clone();
        self.spawn(
            &format!("svc{i}"),
            &program,
            &["serve", "--netns", &ns, "--name", &name, "--address", &b4],
        )
    }

    /// Stops backend `i`'s services (the host stays up).
    pub fn stop_service(&mut self, i: usize) {
        let name = format!("svc{i}");
        for (_, child) in self.children.iter_mut().filter(|(n, _)| *n == name) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.retain(|(n, _)| *n != name);
    }

    /// `vip-agent ARGS` inside LB node `i`'s namespace, talking to its agent's control socket.
    pub fn agent_cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let agent = self.agent.to_string_lossy().into_owned();
        let socket = self.spec.control_socket(&format!("lb{i}"));
        let socket = socket.to_string_lossy();
        let mut cmd = vec![agent.as_str(), "--socket", &socket];
        cmd.extend_from_slice(args);
        in_ns(&self.spec.ns(&format!("lb{i}")), &cmd)
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[&str]) -> Result<()> {
        let log = fs::File::create(self.spec.run_dir().join(format!("{name}.log")))
            .map_err(|e| e.to_string())?;
        let child = Command::new(program)
            .args(args)
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    fn start_agent(&mut self, name: &str, config: &str) -> Result<()> {
        let path = self.spec.run_dir().join(format!("{name}.toml"));
        fs::write(&path, config).map_err(|e| e.to_string())?;
        let ns = self.spec.ns(name);
        let agent = self.agent.clone();
        let path = path.to_string_lossy().into_owned();
        self.spawn(
            name,
            &agent,
            &["run", "--cleanup", "--netns", &ns, "--config", &path],
        )?;
        let link = self.spec.pin_dir(name).join("links/xdp_eth0");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !link.exists() {
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.spec.run_dir().join(format!("{name}.log")))
                    .unwrap_or_default();
                return Err(format!("agent {name} did not attach: {log}"));
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn lb_config(&self, i: usize) -> String {
        let (a4, r4, a6, _) = lb_addrs(i);
        let mut c = format!(
            "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"{a4}\"\nsource_v6 = \"{a6}\"\npin_dir = \"{}\"\n\
             control_socket = \"{}\"\n\n\
             [bgp]\nasn = {LB_ASN}\nrouter_id = \"{a4}\"\nhold_time = 3\nnext_hop_v6 = \"{a6}\"\n\
             [[bgp.peer]]\naddress = \"{r4}\"\nasn = {ROUTER_ASN}\n",
            self.spec.pin_dir(&format!("lb{i}")).display(),
            self.spec.control_socket(&format!("lb{i}")).display(),
        );
        for (vip, proto, port) in [
            (VIP4, "tcp", TCP_PORT),
            (VIP4, "udp", UDP_PORT),
            (VIP6, "tcp", TCP_PORT),
            (VIP6, "udp", UDP_PORT),
            (VIP4, "tcp", IPERF_PORT),
            (VIP4, "udp", IPERF_PORT),
        ] {
            c +=
                &format!("\n[[vip]]\naddress = \"{vip}\"\nprotocol = \"{proto}\"\nport = {port}\n");
            if port == IPERF_PORT {
                // iperf3's control and data connections must reach the same server.
                c += "hash = \"addresses\"\n";
            }
            if self.spec.gue {
                c += &format!("encapsulation = \"gue\"\ngue_port = {GUE_PORT}\n");
            }
            if let Some(health) = &self.spec.health {
                // UDP VIPs are checked with a datagram the lab's service echoes.
                let health = if proto == "udp" {
                    health.replace(
                        "check = \"tcp\"",
                        "check = \"udp\"
udp_expect = \"ping\"",
                    )
                } else {
                    health.clone()
                };
                c += &format!(
                    "[vip.health]
{health}
"
                );
            }
            for (b, weight) in self
                .spec
                .weights
                .iter()
                .enumerate()
                .filter(|(_, w)| **w > 0)
            {
                let (b4, b6) = backend_addrs(b + 1);
                let addr = if vip == VIP6 { b6 } else { b4 };
                c += &format!("[[vip.backend]]\naddress = \"{addr}\"\nweight = {weight}\n");
            }
        }
        c
    }

    fn backend_config(&self, i: usize) -> String {
        let (b4, b6) = backend_addrs(i);
        format!(
            "[node]\nrole = \"backend\"\ninterfaces = [\"eth0\"]\npin_dir = \"{}\"\n\
             control_socket = \"{}\"\n\n\
             [backend]\naddresses = [\"{b4}\", \"{b6}\"]\nvips = [\"{VIP4}\", \"{VIP6}\"]\n\
             gue_port = {GUE_PORT}\n",
            self.spec.pin_dir(&format!("be{i}")).display(),
            self.spec.control_socket(&format!("be{i}")).display(),
        )
    }

    /// The router's kernel route to `vip`.
    pub fn router_route(&self, vip: &str) -> String {
        let family = if vip.contains(':') { "-6" } else { "-4" };
        ip_out(&["-n", &self.spec.ns("router"), family, "route", "show", vip])
    }

    /// Next hops of the router's route to `vip`.
    pub fn router_next_hops(&self, vip: &str) -> usize {
        let route = self.router_route(vip);
        match route.matches("nexthop via").count() {
            0 if route.contains(" via ") => 1,
            n => n,
        }
    }

    /// `vip-agent status` of a node.
    pub fn status(&self, name: &str) -> String {
        Command::new(&self.agent)
            .args(["status", "--pin-dir"])
            .arg(self.spec.pin_dir(name))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Packets LB node `i`'s datapath sent to backends (encapsulated).
    pub fn lb_forwarded(&self, i: usize) -> u64 {
        let status = self.status(&format!("lb{i}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("datapath: "))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|tx| tx.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Makes LB node `i` die abruptly: the router no longer hears from it (its BGP session
    /// times out, the packets it would forward are lost), and its agent is killed.
    pub fn kill_lb(&mut self, i: usize) -> Result<()> {
        let router = self.spec.ns("router");
        let dev = format!("r-lb{i}");
        for family in ["-4", "-6"] {
            ip(&[
                "-n",
                &router,
                family,
                "rule",
                "add",
                "pref",
                "10",
                "iif",
                &dev,
                "blackhole",
            ])?;
        }
        let name = format!("lb{i}");
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| *n == name) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // And its datapath: unpinning the link detaches the program.
        fs::remove_dir_all(self.spec.pin_dir(&name))
            .map_err(|e| format!("detaching lb{i}: {e}"))?;
        Ok(())
    }

    /// Sends SIGTERM to LB node `i`'s agent, as an operator stopping it would: it withdraws
    /// its routes and closes its sessions (Cease); its datapath stays attached.
    pub fn stop_lb(&mut self, i: usize) {
        let name = format!("lb{i}");
        if let Some((_, child)) = self.children.iter().find(|(n, _)| *n == name) {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }

    /// Changes the backends' weights on the LB nodes `lbs` (config rewrite and SIGHUP), and
    /// waits until each has applied it. Weight 0 removes a backend.
    pub fn set_weights(&mut self, weights: &[u32], lbs: &[usize]) -> Result<()> {
        self.spec.weights = weights.to_vec();
        for &i in lbs {
            let name = format!("lb{i}");
            let log_path = self.spec.run_dir().join(format!("{name}.log"));
            let reloads = || {
                fs::read_to_string(&log_path)
                    .unwrap_or_default()
                    .matches("reloaded")
                    .count()
            };
            let before = reloads();
            let config = self.spec.run_dir().join(format!("{name}.toml"));
            fs::write(&config, self.lb_config(i)).map_err(|e| e.to_string())?;
            let child = self
                .children
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or("no such LB node")?;
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.1.id() as i32, libc::SIGHUP) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while reloads() == before {
                if Instant::now() > deadline {
                    return Err(format!("{name} did not reload"));
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Makes the router send the client's packets for `dst` through LB node `lb`, which routes
    /// them back (the LB node "only routing": a baseline for the LB path, same hops, same links).
    pub fn route_through_lb(&self, dst: &str, lb: usize) -> Result<()> {
        let (router, node) = (self.spec.ns("router"), self.spec.ns(&format!("lb{lb}")));
        let (lb4, ..) = lb_addrs(lb);
        sysctl(&node, "net.ipv4.ip_forward", "1")?;
        // It forwards out of the interface the packet came in on: no redirects, no rp check.
        sysctl(&node, "net.ipv4.conf.all.send_redirects", "0")?;
        sysctl(&node, "net.ipv4.conf.eth0.send_redirects", "0")?;
        sysctl(&router, "net.ipv4.conf.all.rp_filter", "0")?;
        sysctl(&router, &format!("net.ipv4.conf.r-lb{lb}.rp_filter"), "0")?;
        let table = "100";
        ip(&[
            "-n", &router, "route", "add", dst, "via", &lb4, "table", table,
        ])?;
        ip(&[
            "-n", &router, "rule", "add", "pref", "50", "iif", "r-client", "to", dst, "lookup",
            table,
        ])
    }

    /// iperf3 from the client to `target` with `args`, its JSON report. Starts iperf3 servers
    /// on every backend first (once): one bound to the VIP, one to the backend's own address,
    /// so that UDP replies leave from the address the client sent to (DSR).
    fn iperf3(&mut self, target: &str, args: &[&str]) -> Result<String> {
        if !self.children.iter().any(|(n, _)| n.starts_with("iperf")) {
            for i in 1..=self.spec.backends() {
                let ns = self.spec.ns(&format!("be{i}"));
                let (own, _) = backend_addrs(i);
                for (tag, address) in [("vip", VIP4), ("own", own.as_str())] {
                    self.spawn(
                        &format!("iperf{i}{tag}"),
                        Path::new("ip"),
                        &[
                            "netns",
                            "exec",
                            &ns,
                            "iperf3",
                            "-s",
                            "-B",
                            address,
                            "-p",
                            &IPERF_PORT.to_string(),
                        ],
                    )?;
                }
            }
            thread::sleep(Duration::from_millis(500));
        }
        let port = IPERF_PORT.to_string();
        let mut cmd = vec!["iperf3", "-c", target, "-p", &port, "-J"];
        cmd.extend_from_slice(args);
        in_ns(&self.spec.ns("client"), &cmd)
    }

    /// TCP throughput (Gbit/s) from the client to `target` over `streams` connections.
    pub fn iperf(&mut self, target: &str, streams: u32, secs: u32) -> Result<f64> {
        let (streams, secs) = (streams.to_string(), secs.to_string());
        let out = self.iperf3(target, &["-P", &streams, "-t", &secs])?;
        Ok(json_number(&out, "sum_received", "bits_per_second")? / 1e9)
    }

    /// UDP packets per second (millions) that reach `target` from the client sending
    /// `len`-byte datagrams as fast as it can.
    pub fn iperf_udp(&mut self, target: &str, len: u32, secs: u32) -> Result<f64> {
        let (len, secs) = (len.to_string(), secs.to_string());
        let out = self.iperf3(target, &["-u", "-b", "0", "-l", &len, "-t", &secs])?;
        let packets = json_number(&out, "sum_received", "packets")?;
        let lost = json_number(&out, "sum_received", "lost_packets")?;
        let seconds = json_number(&out, "sum_received", "seconds")?;
        Ok((packets - lost) / seconds / 1e6)
    }

    /// Opens `n` TCP connections from the client to the IPv4 VIP (each given `timeout` to
    /// answer) and returns them, reads limited to `read_timeout`, with the backend each reached.
    pub fn connections(
        &self,
        n: usize,
        timeout: Duration,
        read_timeout: Duration,
    ) -> Vec<(TcpStream, String)> {
        self.in_client(move || {
            (0..n)
                .map(|_| {
                    let (s, backend, _) =
                        tcp_hello(VIP4.parse().unwrap(), timeout).expect("connect to the VIP");
                    s.set_read_timeout(Some(read_timeout)).unwrap();
                    (s, backend)
                })
                .collect()
        })
    }

    /// Runs `f` on a thread inside the client's namespace; sockets it makes stay there.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.spec.ns("client");
        thread::spawn(move || {
            enter(&ns).expect("client namespace");
            f()
        })
        .join()
        .expect("client thread")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
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
                fs::remove_dir_all(entry.path()).map_err(|e| e.to_string())?;
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

/// The backends' services (run as `vip-demo serve --netns NS --name NAME --address ADDR`): a TCP
/// service on every address (the VIPs on lo, and the backend's own for health checks) that greets
/// each connection with "NAME CLIENT-ADDRESS" and echoes, and a UDP service that answers
/// "NAME CLIENT-ADDRESS PAYLOAD", bound to each VIP (so replies leave from the VIP) and to the
/// backend's own address.
pub fn serve(ns: &str, name: &str, own: &str) -> Result<()> {
    enter(ns)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let bind = |f: &dyn Fn() -> std::io::Result<()>| -> Result<()> {
        loop {
            match f() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(format!("binding in {ns}: {e}")),
                // The agent has not put the VIPs on lo yet.
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    let label = name.to_owned();
    // One dual-stack wildcard listener: the accepted socket's local address is the VIP for
    // client connections, the backend's own address for health checks.
    bind(&|| {
        let tcp = TcpListener::bind(SocketAddr::new("::".parse().expect("any"), TCP_PORT))?;
        let label = label.clone();
        thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                let label = label.clone();
                thread::spawn(move || serve_tcp(stream, &label));
            }
        });
        Ok(())
    })?;
    for udp_addr in [VIP4, VIP6, own] {
        let addr: IpAddr = udp_addr
            .parse()
            .map_err(|_| format!("bad address {udp_addr}"))?;
        let label = name.to_owned();
        bind(&|| {
            let udp = UdpSocket::bind(SocketAddr::new(addr, UDP_PORT))?;
            let label = label.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let mut reply = format!("{label} {} ", from.ip()).into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = udp.send_to(&reply, from);
                }
            });
            Ok(())
        })?;
    }
    loop {
        thread::park();
    }
}

fn serve_tcp(mut stream: TcpStream, label: &str) {
    use std::io::{Read, Write};
    let peer = stream
        .peer_addr()
        .map(|a| a.ip().to_canonical().to_string())
        .unwrap_or_default();
    let _ = stream.write_all(format!("{label} {peer}\n").as_bytes());
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Client side: a TCP connection to a VIP and the greeting (backend, address it saw).
pub fn tcp_hello(vip: IpAddr, timeout: Duration) -> std::io::Result<(TcpStream, String, String)> {
    use std::io::BufRead;
    let addr = SocketAddr::new(vip, TCP_PORT);
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    std::io::BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let backend = parts.next().unwrap_or_default().to_owned();
    let seen = parts.next().unwrap_or_default().to_owned();
    Ok((stream, backend, seen))
}

/// Client side: one UDP flow (its own socket and port); returns (backend, address it saw).
pub fn udp_hello(
    vip: IpAddr,
    payload: &str,
    timeout: Duration,
) -> std::io::Result<(String, String)> {
    let bind: SocketAddr = if vip.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(SocketAddr::new(vip, UDP_PORT))?;
    socket.send(payload.as_bytes())?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    let mut parts = reply.splitn(3, ' ');
    let backend = parts.next().unwrap_or_default().to_owned();
    let seen = parts.next().unwrap_or_default().to_owned();
    if parts.next() != Some(payload) {
        return Err(std::io::Error::other(format!(
            "UDP echo mismatch: {reply:?}"
        )));
    }
    Ok((backend, seen))
}

/// Sends a line on each connection; returns how many echoed it back.
pub fn echo_all(streams: &mut [TcpStream], tag: &str) -> usize {
    use std::io::{Read, Write};
    let mut ok = 0;
    for (i, s) in streams.iter_mut().enumerate() {
        let msg = format!("ping {i} {tag}\n");
        let mut buf = vec![0u8; msg.len()];
        if s.write_all(msg.as_bytes()).is_ok()
            && s.read_exact(&mut buf).is_ok()
            && buf == msg.as_bytes()
        {
            ok += 1;
        }
    }
    ok
}
