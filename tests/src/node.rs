//! Running the real `vip-agent` binary in named network namespaces, and injecting frames.
//!
//! Everything here is removed by name when its guard drops, also when a test fails: the
//! namespace, the agent process, the pin directory.

use std::{
    fs,
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// The agent binary (built by `cargo xtask test`; `VIP_AGENT_BIN` overrides).
pub fn agent_bin() -> PathBuf {
    std::env::var_os("VIP_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/vip-agent")
        })
}

/// Runs the agent binary to completion (`check-config`, `status`, ...).
pub fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .output()
        .expect("run vip-agent (built by `cargo xtask test`)")
}

/// A named network namespace (`ip netns`), deleted on drop, with its pin directory.
pub struct Netns {
    pub name: String,
    pub pin_dir: PathBuf,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        crate::require_root();
        // Tests of one binary run in parallel: a counter keeps their names apart.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("vipt-{tag}-{}-{n}", std::process::id());
        // A leftover of a crashed run with this name would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &name]);
        let ns = Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// An LB node's namespace `up0` (198.18.0.2/24) linked to a gateway's `gw0` (198.18.0.1),
    /// with 198.18.128.0/24 (the backends) routed through the gateway: `(lb, gateway)`.
    pub fn lb_with_gateway(tag: &str) -> (Self, Self) {
        let lb = Self::new(&format!("{tag}-lb"));
        let gw = Self::new(&format!("{tag}-gw"));
        lb.link(("up0", "198.18.0.2/24"), &gw, ("gw0", "198.18.0.1/24"));
        lb.ip(&["route", "add", "198.18.128.0/24", "via", "198.18.0.1"]);
        (lb, gw)
    }

    /// A veth pair, up, from `dev` here to `peer_dev` in `peer`, each with its address
    /// (`198.18.0.2/24`).
    pub fn link(
        &self,
        (dev, address): (&str, &str),
        peer: &Netns,
        (peer_dev, peer_address): (&str, &str),
    ) {
        self.ip(&[
            "link", "add", dev, "type", "veth", "peer", "name", peer_dev, "netns", &peer.name,
        ]);
        self.ip(&["addr", "add", address, "dev", dev]);
        self.ip(&["link", "set", dev, "up"]);
        peer.ip(&["addr", "add", peer_address, "dev", peer_dev]);
        peer.ip(&["link", "set", peer_dev, "up"]);
    }

    /// Where an agent of this namespace has its control socket (beside its config and log).
    pub fn control_socket(&self) -> PathBuf {
        std::env::temp_dir().join(&self.name).join("vip.sock")
    }

    /// `vip-agent ARGS` in the namespace's network but the host's mount namespace (`ip netns
    /// exec` would hide the pins under /sys/fs/bpf), talking to its agent's control socket.
    pub fn agent_cli(&self, args: &[&str]) -> String {
        let socket = self.control_socket();
        let agent = agent_bin();
        let net = format!("--net=/run/netns/{}", self.name);
        let mut cmd = vec![
            net.as_str(),
            agent.to_str().expect("UTF-8 path"),
            "--socket",
            socket.to_str().expect("UTF-8 path"),
        ];
        cmd.extend_from_slice(args);
        run("nsenter", &cmd)
    }

    /// `GET path` from the agent's metrics listener (127.0.0.1:7179) in the namespace; `None`
    /// while nothing answers.
    pub fn http_get(&self, path: &str) -> Option<String> {
        let request = format!("GET {path} HTTP/1.0\r\n\r\n");
        self.within(move || {
            use std::io::Read;
            let mut c = std::net::TcpStream::connect("127.0.0.1:7179").ok()?;
            c.write_all(request.as_bytes()).ok()?;
            let mut r = String::new();
            c.read_to_string(&mut r).ok()?;
            Some(r)
        })
    }

    /// The agent's metrics, as scraped (headers included).
    pub fn metrics(&self) -> String {
        self.http_get("/metrics")
            .expect("the agent's metrics listener")
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        run("ip", &full)
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes stay there).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        thread::spawn(move || {
            let file = fs::File::open(&path).expect("namespace file");
            // SAFETY: setns on a valid namespace fd; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace")
    }

    /// MAC address of a device in the namespace.
    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let brief = self.ip(&["-br", "link", "show", "dev", dev]);
        let text = brief.split_whitespace().nth(2).expect("MAC column");
        let bytes: Vec<u8> = text
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).expect("hex"))
            .collect();
        bytes.try_into().expect("6 bytes")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = fs::remove_dir_all(&self.pin_dir);
        // Configs and logs of agents that ran here (`Agent::start`).
        let _ = fs::remove_dir_all(std::env::temp_dir().join(&self.name));
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `vip-agent run`, killed on drop.
pub struct Agent {
    child: Child,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
}

/// `text` with `socket` as the control socket in `[node]` unless it names one.
fn with_control_socket(socket: &Path, text: &str) -> String {
    if text.contains("control_socket") {
        return text.to_owned();
    }
    text.replacen(
        "[node]\n",
        &format!("[node]\ncontrol_socket = \"{}\"\n", socket.display()),
        1,
    )
}

impl Agent {
    /// Starts `vip-agent run --config CONFIG --netns NS [extra]` with `config_text` written to a
    /// file next to its log.
    /// The config gets the namespace's control socket unless it names one.
    pub fn start(ns: &Netns, config_text: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(&ns.name);
        fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("vip.toml");
        fs::write(
            &config,
            with_control_socket(&ns.control_socket(), config_text),
        )
        .expect("write config");
        let log = dir.join(format!("agent-{}.log", Instant::now().elapsed().as_nanos()));
        let log_file = fs::File::create(&log).expect("log file");
        let child = Command::new(agent_bin())
            .args(["run", "--netns", &ns.name, "--config"])
            .arg(&config)
            .args(extra)
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .stdin(Stdio::null())
            .spawn()
            .expect("start vip-agent (built by `cargo xtask test`)");
        Self {
            child,
            config,
            log,
            socket: ns.control_socket(),
        }
    }

    /// Waits until `path` exists (the agent pinned something), or panics with the agent's log.
    pub fn wait_for(&mut self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !path.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agent exited ({status}) before {}: {}",
                    path.display(),
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not appear: {}",
                path.display(),
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log contains `needle` `count` times.
    pub fn wait_for_log(&mut self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.log_text().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "log lacks {needle:?}: {}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes a new config (with this agent's control socket unless it names one).
    pub fn rewrite_config(&self, text: &str) {
        fs::write(&self.config, with_control_socket(&self.socket, text)).expect("write config");
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the agent to exit (after a signal) and returns whether it exited cleanly.
    pub fn wait(&mut self) -> bool {
        self.exit_status().success()
    }

    /// Waits for the agent to exit (after a signal) and returns its exit status.
    pub fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit: {}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3 (state is
        // not a number, so indices shift by one more).
        let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An AF_PACKET socket bound to a device: sends whole Ethernet frames out of it.
pub struct FrameSender {
    fd: OwnedFd,
}

impl FrameSender {
    /// Opens the socket in `ns` on `dev`.
    pub fn open(ns: &Netns, dev: &str) -> Self {
        let dev = dev.to_owned();
        let fd = ns.within(move || {
            // SAFETY: plain socket(2); the fd is owned below.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            assert!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `raw` is a fresh, valid descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let name = std::ffi::CString::new(dev).unwrap();
            // SAFETY: NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(ifindex, 0, "no such device");
            // SAFETY: zeroed sockaddr_ll is a valid starting point.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: binding our socket to a valid sockaddr_ll of the right size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::from_ref(&sll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            fd
        });
        Self { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        let mut file = fs::File::from(self.fd.try_clone().expect("dup"));
        file.write_all(frame).expect("send frame");
    }
}

/// A TCP service in a namespace that accepts (and closes) connections until dropped: what a
/// health check finds up or down.
pub struct TcpService {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TcpService {
    pub fn start(ns: &Netns, address: &str, port: u16) -> Self {
        let address: std::net::IpAddr = address.parse().expect("an address");
        let listener = ns.within(move || {
            let l = std::net::TcpListener::bind((address, port)).expect("bind the service");
            l.set_nonblocking(true).expect("non-blocking");
            l
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {}
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TcpService {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
