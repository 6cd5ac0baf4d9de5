//! `vip-agent`: runs vip's datapath on a load-balancer node, and looks inside it.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use anyhow::{Context, Result, bail};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand};
use std::collections::{HashMap, HashSet};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use tokio::sync::mpsc;
use vip_agent::{
    balancer::{BackendKey, Balancer, Condition},
    bgp::{self, Speaker, session::State},
    config::{self, AttachMode, Config, Role},
    datapath_log,
    dataplane::{Dataplane, DataplaneOptions, detach_all},
    decap::DecapPlane,
    health::{self, Checker},
    lo::LoopbackVips,
    metrics,
    nexthop::{KernelChanges, Resolver},
};
use vip_common::{
    addr_from_bytes,
    maglev::{MaglevBackend, MaglevTable},
};

#[derive(Parser)]
#[command(version, about = "vip: an XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ControlArgs {
    #[arg(long)]
    backend: Option<IpAddr>,
    #[arg(long)]
    vip: Option<IpAddr>,
    /// The agent's metrics address.
    #[arg(long, default_value = "127.0.0.1:9100")]
    agent: SocketAddr,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath, apply the config, and keep it current.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// On exit, detach the program and remove pins (a plain exit leaves the datapath
        /// forwarding).
        #[arg(long)]
        cleanup: bool,
        /// Run inside this network namespace (`ip netns` name), for labs. Pins stay in the
        /// host's bpffs.
        #[arg(long)]
        netns: Option<String>,
        /// Log every packet for a VIP from the datapath (aya-log, target `vip::datapath`):
        /// for debugging only, it costs a tail call and a record per packet.
        #[arg(long)]
        datapath_log: bool,
    },
    /// Validate a config file without touching the system.
    CheckConfig { file: PathBuf },
    /// Detach the datapath from every interface and remove its pins.
    Detach {
        #[arg(long, default_value = "/sys/fs/bpf/vip")]
        pin_dir: PathBuf,
    },
    /// Show VIPs, backends and counters from the pinned maps.
    Status {
        #[arg(long, default_value = "/sys/fs/bpf/vip")]
        pin_dir: PathBuf,
        /// The running agent's metrics address (attachments, BGP sessions).
        #[arg(long, default_value = "127.0.0.1:9100")]
        agent: SocketAddr,
    },
    /// The connection-tracking entries, decoded.
    Flows {
        #[arg(long, default_value = "/sys/fs/bpf/vip")]
        pin_dir: PathBuf,
        /// Only flows to this VIP address.
        #[arg(long)]
        vip: Option<IpAddr>,
    },
    /// Which backend a flow goes to, found by running a packet of that flow through the loaded
    /// program (BPF_PROG_TEST_RUN). Like any packet of the flow, it leaves a conntrack entry.
    Which {
        #[arg(long, default_value = "/sys/fs/bpf/vip")]
        pin_dir: PathBuf,
        /// VIP as ADDR:PORT ([V6]:PORT).
        #[arg(long)]
        vip: SocketAddr,
        /// Client as ADDR:PORT.
        #[arg(long)]
        flow: SocketAddr,
        #[arg(long, default_value = "tcp")]
        protocol: String,
    },
    /// Drain at run time: a backend (no new flows; established ones continue), of every VIP
    /// or of `--vip`; without `--backend`, the whole node (BGP GRACEFUL_SHUTDOWN). Lasts until
    /// `undrain`, a reload or a restart.
    Drain(ControlArgs),
    /// Ends a run-time drain.
    Undrain(ControlArgs),
    /// The running agent's backends: condition and latest health check.
    Backends {
        /// The agent's metrics address.
        #[arg(long, default_value = "127.0.0.1:9100")]
        agent: SocketAddr,
    },
    /// Maglev table statistics for a backend set: `--backend ADDR[:WEIGHT]`.
    Maglev {
        #[arg(long, default_value_t = vip_common::layout::DEFAULT_TABLE_SIZE)]
        size: u32,
        #[arg(long = "backend", required = true)]
        backends: Vec<String>,
        /// Also show how many slots move when these backends leave.
        #[arg(long)]
        remove: Vec<IpAddr>,
        /// Also show how many slots move when these backends (ADDR[:WEIGHT]) join.
        #[arg(long)]
        add: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // netlink-packet-route warns on every dump that this kernel is newer than it.
        .unwrap_or_else(|_| "info,netlink_packet_route=error".into());
    if let Command::Run {
        datapath_log: true, ..
    } = cli.command
    {
        filter = filter.add_directive(
            format!("{}=debug", datapath_log::TARGET)
                .parse()
                .expect("a valid directive"),
        );
    }
    tracing_subscriber::fmt().with_env_filter(filter).init();
    match cli.command {
        Command::Run {
            config,
            cleanup,
            netns,
            datapath_log,
        } => {
            let cfg = config::load(&config)?;
            if let Some(ns) = netns {
                // Before the runtime exists: its threads inherit this thread's namespace.
                enter_netns(&ns)?;
            }
            tokio::runtime::Runtime::new()?.block_on(run(config, cfg, cleanup, datapath_log))
        }
        Command::CheckConfig { file } => {
            let cfg = config::load(&file)?;
            println!(
                "{}: ok ({} VIPs, {} backends)",
                file.display(),
                cfg.vips.len(),
                cfg.vips.iter().map(|v| v.backends.len()).sum::<usize>()
            );
            Ok(())
        }
        Command::Detach { pin_dir } => {
            let ifaces = detach_all(&pin_dir)
                .with_context(|| format!("removing pins under {}", pin_dir.display()))?;
            println!("detached from {:?}; removed {}", ifaces, pin_dir.display());
            Ok(())
        }
        Command::Status { pin_dir, agent } => {
            status(&pin_dir)?;
            match request(agent, "GET", "/status") {
                Ok(text) => print!("agent:\n{}", indent(&text)),
                Err(e) => println!("agent: {e:#}"),
            }
            Ok(())
        }
        Command::Flows { pin_dir, vip } => flows(&pin_dir, vip),
        Command::Which {
            pin_dir,
            vip,
            flow,
            protocol,
        } => which(&pin_dir, vip, flow, &protocol),
        Command::Maglev {
            size,
            backends,
            remove,
            add,
        } => maglev(size, &backends, &remove, &add),
        Command::Drain(args) => control("POST", "/drain", &args),
        Command::Undrain(args) => control("POST", "/undrain", &args),
        Command::Backends { agent } => {
            print!("{}", request(agent, "GET", "/backends")?);
            Ok(())
        }
    }
}

fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let file = std::fs::File::open(&path)
        .with_context(|| format!("network namespace {name} ({})", path.display()))?;
    // SAFETY: setns on a valid namespace fd; affects only this (still single) thread.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({name}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn options(cfg: &Config, datapath_log: bool) -> DataplaneOptions {
    DataplaneOptions {
        table_size: cfg.node.table_size,
        table_slots: cfg.node.table_slots,
        conntrack_entries: cfg.node.conntrack_entries,
        max_vips: cfg.node.max_vips,
        max_backends: cfg.node.max_backends,
        pin_dir: Some(cfg.node.pin_dir.clone()),
        datapath_log,
    }
}

fn attach_modes(mode: AttachMode) -> &'static [XdpMode] {
    match mode {
        AttachMode::Native => &[XdpMode::Driver],
        AttachMode::Generic => &[XdpMode::Skb],
        AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
    }
}

/// bpf_fib_lookup answers only on interfaces that forward, and packets the datapath passes to
/// the stack for neighbour resolution are forwarded by it: an LB uplink must forward.
fn enable_forwarding(iface: &str) -> Result<()> {
    for family in ["ipv4", "ipv6"] {
        let knob = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
        if std::fs::read_to_string(&knob)
            .map(|v| v.trim() != "1")
            .unwrap_or(true)
        {
            std::fs::write(&knob, "1").with_context(|| format!("enabling {knob}"))?;
            info!(%knob, "enabled forwarding");
        }
    }
    Ok(())
}

/// Data-path health checks: the backend answers the probe from the VIP, which is also on this
/// node's `lo`. IPv4 drops such packets as martians unless the uplink accepts local sources.
fn accept_local(iface: &str) -> Result<()> {
    let knob = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    if std::fs::read_to_string(&knob).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(&knob, "1").with_context(|| format!("enabling {knob}"))?;
    info!(%knob, "enabled for data-path health checks");
    Ok(())
}

/// A started node and what starting it found.
struct Started {
    node: Node,
    /// It took over a running datapath.
    restarted: bool,
    events: Option<mpsc::Receiver<health::Event>>,
    /// How each interface is attached.
    attached: Vec<String>,
}

/// What runs on this node: the load balancer or a backend's decapsulation.
enum Node {
    Lb {
        balancer: Box<Balancer>,
        resolver: Resolver,
        checker: Checker,
    },
    Backend {
        decap: DecapPlane,
    },
}

impl Node {
    /// Loads the program (reusing pinned state), applies `cfg`, and attaches. Also returns
    /// whether it took over a running datapath, and the health checks' events.
    async fn start(cfg: &Config, datapath_log: bool) -> Result<Started> {
        let mut restarted = false;
        let mut attached = Vec::new();
        let mut events = None;
        let mut node = match cfg.node.role {
            Role::Lb => {
                let mut dataplane =
                    Dataplane::load(options(cfg, datapath_log)).context("loading the datapath")?;
                if let Some(log) = dataplane.start_log()? {
                    info!(target = datapath_log::TARGET, "datapath debug logs on");
                    tokio::spawn(async move {
                        if let Err(e) = datapath_log::forward(log).await {
                            warn!(error = %e, "datapath debug logs stopped");
                        }
                    });
                }
                let mut balancer = Box::new(Balancer::new(dataplane));
                let adopted = balancer.adopt_pinned_state()?;
                if adopted > 0 {
                    restarted = true;
                    info!(
                        entries = adopted,
                        "took over pinned state from an earlier agent"
                    );
                }
                let resolver = Resolver::new()?;
                balancer.set_next_hops(resolver.resolve_all(&all_backends(cfg)).await?)?;
                let (checker, rx) = Checker::new();
                events = Some(rx);
                Node::Lb {
                    balancer,
                    resolver,
                    checker,
                }
            }
            Role::Backend => Node::Backend {
                decap: DecapPlane::load(Some(&cfg.node.pin_dir))
                    .context("loading the decapsulation program")?,
            },
        };
        node.apply(cfg)?;
        for iface in &cfg.node.interfaces {
            let modes = attach_modes(cfg.node.attach);
            let pin_dir = &cfg.node.pin_dir;
            let mode = match &mut node {
                Node::Lb { balancer, .. } => {
                    enable_forwarding(iface)?;
                    balancer
                        .dataplane_mut()
                        .attach_pinned(iface, modes, pin_dir)
                }
                Node::Backend { decap } => decap.attach_pinned(iface, modes, pin_dir),
            }
            .with_context(|| format!("attaching XDP to {iface}"))?;
            let how = match mode {
                None => {
                    info!(%iface, "switched the running program to this one (no gap)");
                    "took over the running attachment"
                }
                Some(XdpMode::Skb) => {
                    warn!(%iface, "attached in generic mode: the driver has no native XDP");
                    "generic (skb) mode"
                }
                Some(mode) => {
                    info!(%iface, ?mode, "attached");
                    "driver mode"
                }
            };
            attached.push(format!("{iface}: {how}"));
        }
        Ok(Started {
            node,
            restarted,
            events,
            attached,
        })
    }

    /// Applies a (validated) config to the maps.
    fn apply(&mut self, cfg: &Config) -> Result<()> {
        match self {
            Node::Lb {
                balancer, checker, ..
            } => {
                let report = balancer.apply(cfg)?;
                if cfg.has_datapath_checks() {
                    for iface in &cfg.node.interfaces {
                        accept_local(iface)?;
                    }
                    balancer
                        .dataplane_mut()
                        .attach_health_check_program()
                        .context("attaching the data-path health check program to lo")?;
                }
                checker.sync(cfg, |key| balancer.backend_id(key));
                info!(?report, "config applied");
            }
            Node::Backend { decap } => {
                let role = cfg
                    .backend
                    .as_ref()
                    .context("backend role without [backend]")?;
                decap.set_local_addresses(&role.addresses)?;
                decap.set_vips(&role.vips)?;
                decap.set_gue_port(role.gue_port)?;
                info!(addresses = ?role.addresses, vips = ?role.vips, "decapsulation configured");
            }
        }
        Ok(())
    }

    /// What BGP announces now: VIPs with a backend that takes new flows; with the
    /// GRACEFUL_SHUTDOWN community while the node is drained.
    fn routes(&self, cfg: &Config, node_drained: bool) -> Vec<bgp::session::Route> {
        let mut routes = match self {
            Node::Lb { balancer, .. } => bgp::routes_for(cfg, |k| balancer.usable(k)),
            Node::Backend { .. } => Vec::new(),
        };
        if node_drained {
            for r in &mut routes {
                r.communities.push(bgp::session::GRACEFUL_SHUTDOWN);
            }
        }
        routes
    }

    /// Periodic work: keeping next hops current.
    async fn refresh(&mut self, cfg: &Config) {
        if let Node::Lb {
            balancer, resolver, ..
        } = self
        {
            match resolver.resolve_all(&all_backends(cfg)).await {
                Ok(hops) => match balancer.set_next_hops(hops) {
                    Ok(0) => {}
                    Ok(n) => info!(backends = n, "next hops updated"),
                    Err(e) => error!(error = %e, "writing next hops"),
                },
                Err(e) => warn!(error = %e, "resolving next hops"),
            }
        }
    }
}

/// What the metrics endpoint reads.
struct Shared {
    node: tokio::sync::Mutex<Node>,
    ready: AtomicBool,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    speaker: tokio::sync::Mutex<Option<Speaker>>,
    config: std::sync::Mutex<Config>,
    overrides: std::sync::Mutex<Overrides>,
    attached: Vec<String>,
}

/// Run-time state on top of the config: health verdicts and drains. Drains do not survive a
/// reload: to keep a backend drained, say `state = "draining"` in the config.
#[derive(Default)]
struct Overrides {
    down: HashSet<BackendKey>,
    drained: HashSet<BackendKey>,
    node_drained: bool,
}

impl Overrides {
    fn condition(&self, key: &BackendKey) -> Condition {
        if self.down.contains(key) {
            Condition::Down
        } else if self.drained.contains(key) {
            Condition::Drained
        } else {
            Condition::Up
        }
    }
}

impl Shared {
    /// Applies a backend's condition to the datapath and the announcements.
    async fn update(&self, keys: &[BackendKey]) {
        let (node_drained, conditions): (bool, Vec<(BackendKey, Condition)>) = {
            let o = self.overrides.lock().expect("overrides lock");
            (
                o.node_drained,
                keys.iter().map(|k| (*k, o.condition(k))).collect(),
            )
        };
        let cfg = self.config.lock().expect("config lock").clone();
        let mut node = self.node.lock().await;
        if let Node::Lb { balancer, .. } = &mut *node {
            for (key, condition) in conditions {
                if let Err(e) = balancer.set_condition(key, condition) {
                    error!(backend = %key.1, error = %e, "applying a backend's condition");
                }
            }
        }
        let routes = node.routes(&cfg, node_drained);
        drop(node);
        if let Some(speaker) = &*self.speaker.lock().await {
            speaker.announce(routes);
        }
    }

    /// The backends a drain request names: every VIP's backend at `backend`, or only `vip`'s.
    fn matching(&self, backend: IpAddr, vip: Option<IpAddr>) -> Vec<BackendKey> {
        let cfg = self.config.lock().expect("config lock");
        cfg.vips
            .iter()
            .filter(|v| vip.is_none_or(|a| a == v.address))
            .flat_map(|v| v.backends.iter().map(move |b| (v.key(), b.address)))
            .filter(|(_, a)| *a == backend)
            .collect()
    }
}

/// `key=value` pairs of a request's query string.
fn query(path: &str) -> HashMap<&str, &str> {
    path.split_once('?')
        .map(|(_, q)| q.split('&').filter_map(|kv| kv.split_once('=')).collect())
        .unwrap_or_default()
}

impl metrics::Source for Shared {
    async fn snapshot(&self) -> metrics::Snapshot {
        let node = self.node.lock().await;
        let mut s = metrics::Snapshot {
            reloads_ok: self.reloads_ok.load(Ordering::Relaxed),
            reloads_failed: self.reloads_failed.load(Ordering::Relaxed),
            ..Default::default()
        };
        match &*node {
            Node::Lb {
                balancer, checker, ..
            } => {
                let cfg = self.config.lock().expect("config lock").clone();
                let reports = checker.reports();
                for vip in &cfg.vips {
                    for b in &vip.backends {
                        if let Some(r) = reports.get(&(vip.key(), b.address)) {
                            let label = (vip.to_string(), b.address.to_string());
                            s.health
                                .push((label, r.up, r.latency.as_secs_f64(), r.changes));
                        }
                    }
                }
                s.datapath = balancer.dataplane().stats().ok();
                if let Ok((vips, backends)) = balancer.traffic() {
                    s.vips = vips;
                    s.backends = backends;
                }
            }
            Node::Backend { decap } => s.decap = decap.stats().ok(),
        }
        drop(node);
        if let Some(speaker) = &*self.speaker.lock().await {
            s.bgp = speaker
                .status()
                .into_iter()
                .map(|(peer, st)| {
                    (
                        peer.to_string(),
                        st.state == State::Established,
                        st.announced as u64,
                    )
                })
                .collect();
        }
        s
    }

    async fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    async fn control(&self, method: &str, path: &str) -> (u16, String) {
        let route = path.split('?').next().unwrap_or("");
        let q = query(path);
        match (method, route) {
            ("GET", "/backends") => (200, self.backends_text().await),
            ("GET", "/status") => (200, self.status_text().await),
            ("POST", "/drain" | "/undrain") => {
                let on = route == "/drain";
                let Some(backend) = q.get("backend") else {
                    // The whole node: GRACEFUL_SHUTDOWN on every route (or off again).
                    self.overrides.lock().expect("overrides lock").node_drained = on;
                    self.update(&[]).await;
                    info!(drained = on, "node drain");
                    return (
                        200,
                        format!("node {}\n", if on { "drained" } else { "undrained" }),
                    );
                };
                let Ok(backend) = backend.parse::<IpAddr>() else {
                    return (400, format!("backend {backend:?} is not an address\n"));
                };
                let vip = match q.get("vip").map(|v| v.parse::<IpAddr>()) {
                    Some(Ok(v)) => Some(v),
                    Some(Err(_)) => return (400, "vip is not an address\n".into()),
                    None => None,
                };
                let keys = self.matching(backend, vip);
                if keys.is_empty() {
                    return (404, format!("no VIP has backend {backend}\n"));
                }
                {
                    let mut o = self.overrides.lock().expect("overrides lock");
                    for k in &keys {
                        if on {
                            o.drained.insert(*k);
                        } else {
                            o.drained.remove(k);
                        }
                    }
                }
                self.update(&keys).await;
                info!(%backend, drained = on, count = keys.len(), "backend drain");
                let word = if on { "drained" } else { "undrained" };
                (200, format!("{word} {backend} on {} VIPs\n", keys.len()))
            }
            _ => (404, "not found\n".into()),
        }
    }
}

impl Shared {
    /// What only the running agent knows: attachments, drain, BGP sessions.
    async fn status_text(&self) -> String {
        let mut out = String::new();
        for a in &self.attached {
            out += &format!("attached {a}\n");
        }
        let drained = self.overrides.lock().expect("overrides lock").node_drained;
        out += &format!(
            "node: {}\n",
            if drained {
                "drained (GRACEFUL_SHUTDOWN)"
            } else {
                "serving"
            }
        );
        if let Some(speaker) = &*self.speaker.lock().await {
            for (peer, st) in speaker.status() {
                out += &format!(
                    "bgp peer {peer}: {:?}, {} routes announced",
                    st.state, st.announced
                );
                if let Some(e) = &st.last_error {
                    out += &format!(", last error: {e}");
                }
                out += "\n";
            }
        }
        out
    }

    /// One line per backend of each VIP: condition and latest health check.
    async fn backends_text(&self) -> String {
        let node = self.node.lock().await;
        let Node::Lb { checker, .. } = &*node else {
            return "a backend node has no backends\n".into();
        };
        let reports = checker.reports();
        let cfg = self.config.lock().expect("config lock").clone();
        let o = self.overrides.lock().expect("overrides lock");
        let mut out = String::new();
        for vip in &cfg.vips {
            for b in &vip.backends {
                let key = (vip.key(), b.address);
                let condition = match (o.condition(&key), b.table_weight()) {
                    (Condition::Up, 0) => "draining (config)",
                    (Condition::Up, _) => "active",
                    (Condition::Drained, _) => "drained",
                    (Condition::Down, _) => "down",
                };
                let check = reports
                    .get(&key)
                    .map_or("no health check".to_owned(), |r| r.last_detail.clone());
                out += &format!(
                    "{vip} {} weight {} {condition}: {check}\n",
                    b.address, b.weight
                );
            }
        }
        out
    }
}

async fn run(path: PathBuf, mut cfg: Config, cleanup: bool, datapath_log: bool) -> Result<()> {
    // Before anything else: a signal during start-up waits for the loop below (and a clean
    // shutdown) instead of killing the agent halfway.
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let Started {
        node,
        restarted,
        events: mut health_events,
        attached,
    } = Node::start(&cfg, datapath_log).await?;
    let lo = LoopbackVips::new().await?;
    let (added, removed) = lo.sync(&cfg.loopback_addresses()).await?;
    info!(added, removed, "VIP addresses on lo");
    // Announced only now: the program is attached and the maps are filled.
    let speaker = cfg
        .bgp
        .as_ref()
        .map(|b| Speaker::start(b, node.routes(&cfg, false), restarted));
    let shared = Arc::new(Shared {
        node: tokio::sync::Mutex::new(node),
        ready: AtomicBool::new(true),
        reloads_ok: AtomicU64::new(0),
        reloads_failed: AtomicU64::new(0),
        speaker: tokio::sync::Mutex::new(speaker),
        config: std::sync::Mutex::new(cfg.clone()),
        overrides: std::sync::Mutex::default(),
        attached,
    });
    let metrics_address = cfg.node.metrics_address;
    let mut server = tokio::spawn(metrics::serve(metrics_address, shared.clone()));
    info!(%metrics_address, "serving /metrics, /healthz, /readyz");

    // Next hops follow the kernel's events; the timer only retries what events cannot bring
    // (a neighbour that never answered).
    let mut kernel = KernelChanges::subscribe()?;
    let mut refresh = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = hangup.recv() => reload(&path, &mut cfg, &shared, &lo).await,
            Some(()) = kernel.next() => shared.node.lock().await.refresh(&cfg).await,
            _ = refresh.tick() => shared.node.lock().await.refresh(&cfg).await,
            Some(event) = async { health_events.as_mut()?.recv().await } => {
                if event.up {
                    info!(vip = ?event.key.0, backend = %event.key.1, reason = %event.reason, "backend up");
                    shared.overrides.lock().expect("overrides lock").down.remove(&event.key);
                } else {
                    warn!(vip = ?event.key.0, backend = %event.key.1, reason = %event.reason, "backend down");
                    shared.overrides.lock().expect("overrides lock").down.insert(event.key);
                }
                shared.update(&[event.key]).await;
            }
            result = &mut server => {
                bail!("metrics server on {metrics_address} stopped: {result:?}");
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    if let Some(speaker) = shared.speaker.lock().await.take() {
        let drain = speaker.settings().drain_time;
        speaker.stop(drain).await;
    }
    server.abort();
    drop(shared);
    if cleanup {
        lo.sync(&[]).await?;
        let ifaces = detach_all(&cfg.node.pin_dir)?;
        info!(?ifaces, "detached, removed pins and VIP addresses");
    } else {
        info!(
            "stopping; the datapath keeps forwarding (use --cleanup or `vip-agent detach` to remove it)"
        );
    }
    Ok(())
}

/// SIGHUP: a new config, validated whole; a bad one changes nothing.
async fn reload(path: &Path, cfg: &mut Config, shared: &Shared, lo: &LoopbackVips) {
    let new = match config::load(path) {
        Ok(new) => new,
        Err(e) => {
            shared.reloads_failed.fetch_add(1, Ordering::Relaxed);
            error!(error = %e, "reload rejected; the running config stays");
            return;
        }
    };
    if new.node != cfg.node || bgp_settings(&new) != bgp_settings(cfg) {
        shared.reloads_failed.fetch_add(1, Ordering::Relaxed);
        error!("node or BGP session settings changed: they need a restart; nothing applied");
        return;
    }
    let applied = shared.node.lock().await.apply(&new);
    if let Err(e) = applied {
        shared.reloads_failed.fetch_add(1, Ordering::Relaxed);
        error!(error = %e, "reload failed part way; fix and reload again");
        return;
    }
    *cfg = new;
    *shared.config.lock().expect("config lock") = cfg.clone();
    shared.reloads_ok.fetch_add(1, Ordering::Relaxed);
    // Run-time drains end with a reload; health verdicts of backends still configured stay.
    let undrained: Vec<BackendKey> = {
        let mut o = shared.overrides.lock().expect("overrides lock");
        o.node_drained = false;
        std::mem::take(&mut o.drained).into_iter().collect()
    };
    shared.update(&undrained).await;
    match lo.sync(&cfg.loopback_addresses()).await {
        Ok((added, removed)) => info!(added, removed, "reloaded"),
        Err(e) => error!(error = %e, "updating VIP addresses on lo"),
    }
}

/// BGP settings that need a restart when changed (everything but the announcement set).
fn bgp_settings(cfg: &Config) -> Option<&vip_agent::config::BgpConfig> {
    cfg.bgp.as_ref()
}

fn all_backends(cfg: &Config) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = cfg
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Opens the running datapath's pinned maps (a second copy of the program, not attached),
/// with the sizes it was loaded with.
fn open_pinned(pin_dir: &Path) -> Result<Dataplane> {
    if !pin_dir.join(vip_common::layout::VIPS).exists() {
        bail!("no vip datapath pinned under {}", pin_dir.display());
    }
    let options = DataplaneOptions::from_pins(pin_dir)
        .with_context(|| format!("reading the datapath's sizes under {}", pin_dir.display()))?;
    Dataplane::load(options).context("opening the pinned maps")
}

fn flows(pin_dir: &Path, vip: Option<IpAddr>) -> Result<()> {
    let dp = open_pinned(pin_dir)?;
    let backends: std::collections::HashMap<u32, IpAddr> = dp
        .backends()?
        .into_iter()
        .filter_map(|(id, b)| Some((id, addr_from_bytes(&b.addr, b.family)?)))
        .collect();
    let mut shown = 0;
    for (flow, entry) in dp.flows()? {
        let (Some(src), Some(dst)) = (
            addr_from_bytes(&flow.src, flow.family),
            addr_from_bytes(&flow.dst, flow.family),
        ) else {
            continue;
        };
        if vip.is_some_and(|v| v != dst) {
            continue;
        }
        let proto = match flow.proto {
            vip_common::IPPROTO_TCP => "tcp",
            vip_common::IPPROTO_UDP => "udp",
            _ => "?",
        };
        let backend = backends.get(&entry.backend).map_or_else(
            || format!("#{} (removed)", entry.backend),
            |a| a.to_string(),
        );
        println!(
            "{proto} {} -> {} backend {backend}",
            SocketAddr::new(src, u16::from_be_bytes(flow.src_port)),
            SocketAddr::new(dst, u16::from_be_bytes(flow.dst_port)),
        );
        shown += 1;
    }
    println!("{shown} flows");
    Ok(())
}

fn which(pin_dir: &Path, vip: SocketAddr, flow: SocketAddr, protocol: &str) -> Result<()> {
    let proto = match protocol {
        "tcp" => vip_common::IPPROTO_TCP,
        "udp" => vip_common::IPPROTO_UDP,
        other => bail!("protocol {other}: use tcp or udp"),
    };
    if vip.is_ipv4() != flow.is_ipv4() {
        bail!("--vip and --flow must be of the same family");
    }
    let mut dp = open_pinned(pin_dir)?;
    let frame = vip_agent::probe::frame(flow, vip, proto);
    let (action, out) = vip_agent::probe::run(&mut dp, &frame)?;
    match vip_agent::probe::outer_destination(&frame, &out) {
        Some(backend) => println!("{protocol} {flow} -> {vip}: backend {backend}"),
        None => println!("{protocol} {flow} -> {vip}: not forwarded (XDP action {action})"),
    }
    Ok(())
}

fn status(pin_dir: &Path) -> Result<()> {
    let dp = open_pinned(pin_dir)?;
    let s = dp.stats()?;
    println!(
        "datapath: {} passed, {} tx, {} redirected, {} conntrack hits, {} misses",
        s.passed, s.tx, s.redirected, s.conntrack_hit, s.conntrack_miss
    );
    println!(
        "  drops: {} fragments, {} ip options, {} malformed, {} no backend, {} no headroom; passed for resolution: {} no neighbour, {} no route",
        s.drop_fragment,
        s.drop_ip_options,
        s.drop_malformed,
        s.drop_no_backend,
        s.drop_no_headroom,
        s.no_neighbour_passed,
        s.no_route_passed
    );
    println!(
        "  new flows not recorded (conntrack insert limit): {}",
        s.conntrack_insert_skipped
    );
    println!("VIPs (traffic of their present backends):");
    let traffic = dp.traffic_by_vip()?;
    for (key, meta) in dp.vips()? {
        let t = traffic.get(&meta.vip_id).copied().unwrap_or_default();
        let addr = addr_from_bytes(&key.addr, key.family).map_or("?".into(), |a| a.to_string());
        let port = u16::from_be_bytes(key.port);
        let encap = if meta.flags & vip_common::VIP_F_GUE != 0 {
            format!("GUE to port {}", u16::from_be_bytes(meta.gue_port))
        } else {
            "IP-in-IP".to_owned()
        };
        println!(
            "  {addr} proto {} port {} ({encap}) -> table slot {}: {} packets, {} bytes",
            key.proto,
            if port == 0 {
                "*".into()
            } else {
                port.to_string()
            },
            meta.table,
            t.packets,
            t.bytes
        );
    }
    let vips = dp.vips()?;
    println!("backends:");
    for (id, b) in dp.backends()? {
        let vip = vips
            .iter()
            .find(|(_, m)| m.vip_id == b.vip_id)
            .and_then(|(k, _)| addr_from_bytes(&k.addr, k.family))
            .map_or("?".to_owned(), |a| a.to_string());
        let t = dp.backend_traffic(id)?;
        let addr = addr_from_bytes(&b.addr, b.family).map_or("?".into(), |a| a.to_string());
        let hop = if b.flags & vip_common::BACKEND_F_NEXTHOP != 0 {
            format!("via ifindex {} to {}", b.ifindex, mac(&b.dst_mac))
        } else {
            "next hop unresolved (FIB lookup)".into()
        };
        println!(
            "  [{id}] {addr} of VIP {vip} {hop}: {} packets, {} bytes",
            t.packets, t.bytes
        );
    }
    Ok(())
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn control(method: &str, route: &str, args: &ControlArgs) -> Result<()> {
    let mut path = route.to_owned();
    let mut sep = '?';
    if let Some(b) = args.backend {
        path += &format!("{sep}backend={b}");
        sep = '&';
    }
    if let Some(v) = args.vip {
        path += &format!("{sep}vip={v}");
    }
    print!("{}", request(args.agent, method, &path)?);
    Ok(())
}

/// One HTTP/1.0 request to the running agent; the body, or an error with it.
fn request(agent: SocketAddr, method: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect_timeout(&agent, Duration::from_secs(3))
        .with_context(|| {
            format!("no agent at {agent} (is it running? its node.metrics_address?)")
        })?;
    conn.write_all(format!("{method} {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}: {}", head.lines().next().unwrap_or(""), body.trim());
    }
    Ok(body.to_owned())
}

/// `ADDR`, `ADDR:WEIGHT` or `[V6ADDR]:WEIGHT`.
fn parse_weighted(spec: &str) -> Result<(IpAddr, u32)> {
    if let Ok(addr) = spec.parse::<IpAddr>() {
        return Ok((addr, 1));
    }
    let (addr, weight) = spec.rsplit_once(':').context("not an address")?;
    Ok((addr.trim_matches(['[', ']']).parse()?, weight.parse()?))
}

fn maglev(size: u32, specs: &[String], remove: &[IpAddr], add: &[String]) -> Result<()> {
    let mut backends = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (addr, weight) = parse_weighted(spec).with_context(|| {
            format!("backend {spec}: use ADDR or ADDR:WEIGHT (IPv6 with weight: [ADDR]:WEIGHT)")
        })?;
        backends.push(MaglevBackend {
            addr,
            weight,
            id: i as u32,
        });
    }
    let start = std::time::Instant::now();
    let table = MaglevTable::build(size, &backends)?;
    let took = start.elapsed();
    let total_weight: u32 = backends.iter().map(|b| b.weight).sum();
    println!("table size {size}, built in {took:?}");
    println!(
        "{:<40} {:>6} {:>8} {:>8} {:>8}",
        "backend", "weight", "slots", "share", "ideal"
    );
    let mut worst: f64 = 0.0;
    for b in &backends {
        let slots = table.share(b.id);
        let share = slots as f64 / f64::from(size);
        let ideal = f64::from(b.weight) / f64::from(total_weight.max(1));
        if ideal > 0.0 {
            worst = worst.max((share / ideal - 1.0).abs());
        }
        println!(
            "{:<40} {:>6} {:>8} {:>7.3}% {:>7.3}%",
            b.addr.to_string(),
            b.weight,
            slots,
            share * 100.0,
            ideal * 100.0
        );
    }
    println!(
        "largest deviation from the weighted ideal: {:.3}%",
        worst * 100.0
    );
    if remove.is_empty() && add.is_empty() {
        return Ok(());
    }
    let mut changed: Vec<MaglevBackend> = backends
        .iter()
        .filter(|b| !remove.contains(&b.addr))
        .copied()
        .collect();
    for spec in add {
        let (addr, weight) = parse_weighted(spec).with_context(|| format!("--add {spec}"))?;
        changed.push(MaglevBackend {
            addr,
            weight,
            id: backends.len() as u32 + changed.len() as u32,
        });
    }
    let after = MaglevTable::build(size, &changed)?;
    let moved = table.moved_slots(&after);
    let removed_own: usize = backends
        .iter()
        .filter(|b| remove.contains(&b.addr))
        .map(|b| table.share(b.id))
        .sum();
    println!(
        "after removing {} and adding {}: {moved} slots move ({:.2}%), {removed_own} of them the \
         removed backends' own, {} others ({:.2}% of the table)",
        remove.len(),
        add.len(),
        moved as f64 / f64::from(size) * 100.0,
        moved - removed_own,
        (moved - removed_own) as f64 / f64::from(size) * 100.0
    );
    Ok(())
}
