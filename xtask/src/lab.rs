//! A load-balancer lab in network namespaces: a client, a router, LB nodes running vip-agent
//! with XDP on their uplinks, and backends running vip-agent in the backend role (decapsulation,
//! VIPs on `lo`) with small TCP and UDP services. Lab-only ranges: 198.18.0.0/15, fd00::/8.
//!
//! ```text
//!  client ── router ── lb1 (XDP)      VIPs 198.19.0.1, fd00:19::1: router → lb1 → router → beN
//!              ├────── be1 ─┐         replies: beN → router → client (DSR, the LB never sees them)
//!              ├────── be2  ├ decap, VIPs on lo, services
//!              └────── be3 ─┘
//! ```
//!
//! Everything the lab makes is named with the `vipdemo` prefix, so `down` removes it by name,
//! also after a crash.

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub const PREFIX: &str = "vipdemo";
pub const VIP4: &str = "198.19.0.1";
pub const VIP6: &str = "fd00:19::1";
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const BACKENDS: usize = 3;

pub fn ns(name: &str) -> String {
    format!("{PREFIX}-{name}")
}

fn pin_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{PREFIX}-{name}"))
}

fn run_dir() -> PathBuf {
    PathBuf::from(format!("/run/{PREFIX}"))
}

/// `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip netns exec NS CMD...`, failing with its stderr.
pub fn in_ns(ns: &str, cmd: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!(
            "[{ns}] {}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    in_ns(ns, &["sysctl", "-qw", &format!("{key}={value}")]).map(|_| ())
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter(ns: &str) -> Result<()> {
    let file = fs::File::open(Path::new("/run/netns").join(ns))
        .with_context(|| format!("network namespace {ns}"))?;
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A veth between two namespaces, both ends up, addressed.
fn link(
    a: &str,
    a_dev: &str,
    a_addrs: &[&str],
    b: &str,
    b_dev: &str,
    b_addrs: &[&str],
) -> Result<()> {
    ip(&[
        "link", "add", a_dev, "netns", a, "type", "veth", "peer", "name", b_dev, "netns", b,
    ])?;
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

/// The running lab: agent processes, removed on drop.
pub struct Lab {
    agents: Vec<(String, Child)>,
    agent: PathBuf,
    decap_object: PathBuf,
}

impl Lab {
    /// Builds the topology and starts the agents; waits until every XDP program is attached.
    pub fn up(agent: &Path, decap_object: &Path) -> Result<Self> {
        down()?;
        let mut lab = Self {
            agents: Vec::new(),
            agent: agent.to_owned(),
            decap_object: decap_object.to_owned(),
        };
        lab.topology()?;
        fs::create_dir_all(run_dir())?;
        lab.start_agent("lb1", &lb_config())?;
        for i in 1..=BACKENDS {
            lab.start_agent(&format!("be{i}"), &backend_config(i))?;
        }
        for name in lab
            .agents
            .iter()
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>()
        {
            wait_for(
                &pin_dir(&name).join("links/xdp_eth0"),
                Duration::from_secs(20),
            )
            .with_context(|| {
                format!(
                    "agent {name} did not attach (log: {})",
                    log(&name).display()
                )
            })?;
        }
        Ok(lab)
    }

    fn topology(&self) -> Result<()> {
        for n in ["client", "router", "lb1"]
            .into_iter()
            .map(String::from)
            .chain((1..=BACKENDS).map(|i| format!("be{i}")))
        {
            ip(&["netns", "add", &ns(&n)])?;
            ip(&["-n", &ns(&n), "link", "set", "lo", "up"])?;
        }
        let (client, router, lb1) = (ns("client"), ns("router"), ns("lb1"));
        link(
            &client,
            "eth0",
            &["198.18.0.10/24", "fd00:18::10/64"],
            &router,
            "r-client",
            &["198.18.0.1/24", "fd00:18::1/64"],
        )?;
        link(
            &lb1,
            "eth0",
            &["198.18.2.2/24", "fd00:18:2::2/64"],
            &router,
            "r-lb1",
            &["198.18.2.1/24", "fd00:18:2::1/64"],
        )?;
        default_routes(&client, "198.18.0.1", "fd00:18::1")?;
        default_routes(&lb1, "198.18.2.1", "fd00:18:2::1")?;
        for i in 1..=BACKENDS {
            let be = ns(&format!("be{i}"));
            link(
                &be,
                "eth0",
                &[&format!("198.18.1{i}.2/24"), &format!("fd00:18:1{i}::2/64")],
                &router,
                &format!("r-be{i}"),
                &[&format!("198.18.1{i}.1/24"), &format!("fd00:18:1{i}::1/64")],
            )?;
            default_routes(&be, &format!("198.18.1{i}.1"), &format!("fd00:18:1{i}::1"))?;
            // DSR: the inner packet's source is the client, replies leave from the VIP.
            sysctl(&be, "net.ipv4.conf.all.rp_filter", "0")?;
            sysctl(&be, "net.ipv4.conf.eth0.rp_filter", "0")?;
        }
        sysctl(&router, "net.ipv4.ip_forward", "1")?;
        sysctl(&router, "net.ipv6.conf.all.forwarding", "1")?;
        // Replies from the VIP arrive from backends, not from the LB the VIP is routed to.
        sysctl(&router, "net.ipv4.conf.all.rp_filter", "0")?;
        // The VIPs, routed to the LB node (BGP announces them once the BGP issue lands).
        ip(&[
            "-n",
            &router,
            "route",
            "add",
            &format!("{VIP4}/32"),
            "via",
            "198.18.2.2",
        ])?;
        ip(&[
            "-n",
            &router,
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            "fd00:18:2::2",
        ])?;
        // XDP_TX out of a veth reaches the peer only if the peer runs an XDP program: give the
        // router's side vip's decap program with empty maps, which passes everything.
        let obj = self.decap_object.to_string_lossy().into_owned();
        ip(&[
            "-n", &router, "link", "set", "dev", "r-lb1", "xdpdrv", "obj", &obj, "sec", "xdp",
        ])?;
        // Full checksums from the client (veth offload would leave them to "hardware").
        in_ns(&client, &["ethtool", "-K", "eth0", "tx", "off"])?;
        Ok(())
    }

    fn start_agent(&mut self, name: &str, config: &str) -> Result<()> {
        let path = run_dir().join(format!("{name}.toml"));
        fs::write(&path, config)?;
        let log_file = fs::File::create(log(name))?;
        let child = Command::new(&self.agent)
            .args(["run", "--cleanup", "--netns", &ns(name), "--config"])
            .arg(&path)
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.agent.display()))?;
        self.agents.push((name.to_owned(), child));
        Ok(())
    }

    /// `vip-agent status` of an LB node.
    pub fn status(&self, name: &str) -> Result<String> {
        let out = Command::new(&self.agent)
            .args(["status", "--pin-dir"])
            .arg(pin_dir(name))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills an agent abruptly (no cleanup): its pinned datapath keeps running.
    pub fn kill_agent(&mut self, name: &str) -> Result<()> {
        if let Some((_, child)) = self.agents.iter_mut().find(|(n, _)| n == name) {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts an LB agent again (it takes over the pinned datapath).
    pub fn restart_lb(&mut self, name: &str) -> Result<()> {
        self.agents.retain(|(n, _)| n != name);
        self.start_agent(name, &lb_config())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.agents {
            // SIGTERM: the agents run with --cleanup and remove their pins and addresses.
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.agents {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = down() {
            eprintln!("lab teardown: {e:#}");
        }
    }
}

fn log(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.log"))
}

fn wait_for(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Removes everything the lab makes, by name: agents, namespaces, pins. Safe to run any time.
pub fn down() -> Result<()> {
    // Agents of a crashed run: by their config path.
    let _ = Command::new("pkill")
        .args(["-f", &format!("{}/", run_dir().display())])
        .status();
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&format!("{PREFIX}-")) {
            ip(&["netns", "del", name])?;
        }
    }
    for entry in fs::read_dir("/sys/fs/bpf")?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{PREFIX}-"))
        {
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

fn lb_config() -> String {
    let mut c = format!(
        "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"198.18.2.2\"\n\
         source_v6 = \"fd00:18:2::2\"\npin_dir = \"{}\"\n",
        pin_dir("lb1").display()
    );
    // Every VIP gets every backend, of the VIP's family.
    for (vip, proto, port) in [
        (VIP4, "tcp", TCP_PORT),
        (VIP4, "udp", UDP_PORT),
        (VIP6, "tcp", TCP_PORT),
    ] {
        c += &format!("\n[[vip]]\naddress = \"{vip}\"\nprotocol = \"{proto}\"\nport = {port}\n");
        for i in 1..=BACKENDS {
            let backend = if vip == VIP6 {
                format!("fd00:18:1{i}::2")
            } else {
                format!("198.18.1{i}.2")
            };
            c += &format!("\n[[vip.backend]]\naddress = \"{backend}\"\n");
        }
    }
    c
}

fn backend_config(i: usize) -> String {
    format!(
        r#"[node]
role = "backend"
interfaces = ["eth0"]
pin_dir = "{}"

[backend]
addresses = ["198.18.1{i}.2", "fd00:18:1{i}::2"]
vips = ["{VIP4}", "{VIP6}"]
"#,
        pin_dir(&format!("be{i}")).display()
    )
}

/// Runs the backends' services: a TCP server that answers each connection with its backend's
/// name (and echoes), and a UDP echo server bound to the VIP (so replies leave from the VIP).
pub fn start_services() -> Result<()> {
    for i in 1..=BACKENDS {
        let name = format!("be{i}");
        for vip in [VIP4, VIP6] {
            let addr: IpAddr = vip.parse()?;
            let tcp = bound(&name, move || {
                TcpListener::bind(SocketAddr::new(addr, TCP_PORT))
            })?;
            let label = name.clone();
            thread::spawn(move || {
                for stream in tcp.incoming().flatten() {
                    let label = label.clone();
                    thread::spawn(move || serve_tcp(stream, &label));
                }
            });
        }
        let udp = bound(&name, move || {
            UdpSocket::bind((VIP4.parse::<IpAddr>().unwrap(), UDP_PORT))
        })?;
        let label = name.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let mut reply = label.as_bytes().to_vec();
                reply.push(b' ');
                reply.extend_from_slice(&buf[..n]);
                let _ = udp.send_to(&reply, from);
            }
        });
    }
    Ok(())
}

/// Creates a socket inside backend `name`'s namespace (a short-lived thread enters it; the
/// socket stays in that namespace). Retries while the agent has not yet put the VIP on lo.
fn bound<T: Send + 'static>(
    name: &str,
    make: impl Fn() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let ns_name = ns(name);
    thread::spawn(move || -> Result<T> {
        enter(&ns_name)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match make() {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).context(format!("binding a service in {ns_name}"));
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("service thread panicked"))?
}

fn serve_tcp(mut stream: std::net::TcpStream, label: &str) {
    use std::io::{Read, Write};
    let _ = stream.write_all(format!("{label}\n").as_bytes());
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}
