//! The agent's runtime: one task owns the node (datapath and applied state), the running config,
//! every backend's status and the BGP announcements, and changes them one event at a time:
//! signals, health-check results, kernel route changes, and commands from the control socket.
//! Readers (`/metrics`, `status`, `backends`) get a [`View`] it publishes after each change and
//! never wait for it.
//!
//! A reload runs in phases, so that a VIP is announced only while this node forwards it:
//! validate the file, plan the map writes (refused whole if they do not fit), withdraw what
//! leaves (after announcing it with GRACEFUL_SHUTDOWN for the drain time), write the maps,
//! announce, and update `lo`.

mod backends;
mod config_watch;
mod node;

use config_watch::ConfigWatch;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{debug, error, info, warn};

use crate::{
    announce::{self, Announcer},
    apply::{Plan, VipAccount},
    bgp::{self, session::Route},
    config::{self, Config, VipName},
    control::{
        DrainOutcome, DrainTarget, Response,
        server::{Command, ControlSocket},
    },
    dataplane::{Counters, detach_all},
    egress,
    health::Observation,
    metrics::{self, MetricsSources},
    net::{lo::LoopbackVips, nexthop::KernelChanges},
    sync::{Received, Sync, exceptions},
    view::View,
};
use backends::BackendStatus;
use node::{Loaded, Node};

/// How the agent was asked to run.
pub struct RunOptions {
    pub config_path: PathBuf,
    /// On exit, detach the program and remove pins and VIP addresses.
    pub cleanup: bool,
    pub datapath_log: bool,
    /// Reload when the config file's content changes (see [`config_watch`]).
    pub watch_config: bool,
}

/// The signals the runtime answers; installed before anything else, so a signal during
/// start-up waits for a clean shutdown instead of killing the agent half way.
struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
    /// SIGUSR2: exit to be restarted (see [`Exit::Restart`]).
    restart: Signal,
}

/// How the agent ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT: the node stops serving (drain, withdraw).
    Stop,
    /// SIGUSR2: the agent exits to be started again while the pinned datapath forwards; BGP
    /// sessions close without withdrawing, so routers with graceful restart keep the routes.
    Restart,
}

/// The exit status of [`Exit::Restart`] (EX_TEMPFAIL): a supervisor restarts the agent
/// (systemd's `Restart=on-failure`, a pod's restart policy).
pub const RESTART_EXIT_STATUS: i32 = 75;

/// Runs the agent with a validated `config` until SIGTERM or SIGINT.
pub async fn run(options: RunOptions, config: Config) -> Result<Exit> {
    let mut signals = Signals {
        hangup: signal(SignalKind::hangup())?,
        terminate: signal(SignalKind::terminate())?,
        interrupt: signal(SignalKind::interrupt())?,
        restart: signal(SignalKind::user_defined2())?,
    };
    // The listeners first: a port or socket that is taken fails start-up before anything on
    // the node changes.
    let metrics_address = config.node.metrics_address;
    let listener = TcpListener::bind(metrics_address)
        .await
        .with_context(|| format!("metrics address {metrics_address}"))?;
    let control = ControlSocket::bind(&config.node.control_socket)?;
    let bfd_listener = config
        .bgp
        .as_ref()
        .filter(|b| b.peers.iter().any(|p| p.bfd))
        .map(|_| crate::bfd::Listener::bind())
        .transpose()
        .with_context(|| format!("BFD's UDP port {}", crate::bfd::PORT))?;
    let sync_listener = match &config.sync {
        Some(s) => Some(
            crate::sync::Listener::bind(s.listen)
                .await
                .with_context(|| format!("flow-state sharing's address {}", s.listen))?,
        ),
        None => None,
    };
    let Loaded {
        node,
        restarted,
        observations,
    } = Node::load(&config, options.datapath_log).await?;
    let (sync, mut sync_received) = match (&config.sync, sync_listener) {
        (Some(s), Some(listener)) => {
            let (sync, received) = Sync::start(s, listener);
            (Some(sync), Some(received))
        }
        _ => (None, None),
    };
    let mut status = BackendStatus::default();
    status.sync(&config, false, Instant::now());
    let lo = LoopbackVips::new().await?;
    let (view, view_rx) = watch::channel(View::default());
    let config_watch = options
        .watch_config
        .then(|| ConfigWatch::new(options.config_path.clone()));
    let mut runtime = Runtime {
        path: options.config_path,
        config,
        node,
        status,
        node_drained: false,
        announcer: None,
        lo,
        reloads_ok: 0,
        reloads_failed: 0,
        last_reload: None,
        attached: Vec::new(),
        ready: false,
        view,
        view_stale: false,
        blocks: egress::Blocks::default(),
        sync,
    };
    runtime
        .start(restarted, bfd_listener, sync_received.as_mut())
        .await?;

    let sessions = runtime
        .announcer
        .as_ref()
        .map(Announcer::sessions)
        .unwrap_or_default();
    let counters = match &runtime.node {
        Node::Lb(_) => Counters::open_lb(&runtime.config.node.pin_dir),
        Node::Backend(_) => Counters::open_decap(&runtime.config.node.pin_dir),
    }
    .context("opening the datapath's counters")?;
    let counters = Arc::new(counters);
    let sources = Arc::new(MetricsSources {
        view: view_rx.clone(),
        counters: counters.clone(),
        sessions: sessions.clone(),
        census: Default::default(),
        sync: runtime.sync.as_ref().map(|s| s.counters.clone()),
    });
    let mut metrics_server = tokio::spawn(metrics::serve(listener, sources));
    info!(%metrics_address, "serving /metrics, /healthz, /readyz");
    let (commands_tx, commands) = mpsc::channel(16);
    let socket = runtime.config.node.control_socket.clone();
    let sync_counters = runtime.sync.as_ref().map(|s| s.counters.clone());
    let control_server =
        tokio::spawn(control.serve(view_rx, sessions, counters, sync_counters, commands_tx));
    info!(socket = %socket.display(), "control socket");

    let result = runtime
        .serve(
            &mut signals,
            observations,
            commands,
            &mut metrics_server,
            config_watch,
            sync_received,
        )
        .await;
    control_server.abort();
    metrics_server.abort();
    // The control socket's file goes with its listener.
    let _ = control_server.await;
    // A runtime that failed stops like one told to.
    let exit = *result.as_ref().unwrap_or(&Exit::Stop);
    runtime.stop(options.cleanup, exit).await?;
    result
}

/// The one owner of the node's state.
struct Runtime {
    path: PathBuf,
    config: Config,
    node: Node,
    status: BackendStatus,
    node_drained: bool,
    /// BGP or kernel routes.
    announcer: Option<Announcer>,
    lo: LoopbackVips,
    reloads_ok: u64,
    reloads_failed: u64,
    /// When the last reload was tried, and whether it was applied.
    last_reload: Option<(std::time::SystemTime, bool)>,
    attached: Vec<String>,
    /// The datapath is attached and holds the running config.
    ready: bool,
    view: watch::Sender<View>,
    /// Health checks have reported since the view was last published.
    view_stale: bool,
    /// Egress blocks that rest since their backend left.
    blocks: egress::Blocks,
    /// Flow-state sharing with the tier's other LB nodes.
    sync: Option<Sync>,
}

/// How often the runtime looks for egress blocks whose rest ended.
const REST_TICK: Duration = Duration::from_secs(1);

/// How often check results that change nothing reach the published view.
const VIEW_TICK: Duration = Duration::from_millis(200);

impl Runtime {
    /// Writes the config into the maps, attaches, puts the VIPs on `lo`, and only then
    /// announces them.
    async fn start(
        &mut self,
        restarted: bool,
        bfd_listener: Option<crate::bfd::Listener>,
        sync_received: Option<&mut mpsc::Receiver<Received>>,
    ) -> Result<()> {
        match &mut self.node {
            Node::Lb(lb) => {
                let target = self
                    .status
                    .target(&self.config, &self.blocks, Instant::now());
                let report = lb.write(&target).context("applying the config")?;
                info!(?report, "config applied");
                lb.sync_checks(&self.config)?;
            }
            Node::Backend(backend) => {
                backend.configure(&self.config)?;
                backend.sync_source_nat(&self.config, &self.blocks, Instant::now())?;
            }
        }
        self.attached = self.node.attach(&self.config)?;
        self.ready = true;
        let (added, removed) = self.lo.sync(&self.config.loopback_addresses()).await?;
        info!(added, removed, "VIP addresses on lo");
        self.share_exceptions();
        if let Some(received) = sync_received {
            self.fetch_exceptions(received).await;
        }
        self.announcer = Announcer::start(&self.config, self.routes(), restarted, bfd_listener)
            .await
            .context("starting the announcer")?;
        self.publish();
        Ok(())
    }

    async fn serve(
        &mut self,
        signals: &mut Signals,
        mut observations: Option<mpsc::Receiver<Observation>>,
        mut commands: mpsc::Receiver<Command>,
        metrics_server: &mut tokio::task::JoinHandle<std::io::Result<()>>,
        mut config_watch: Option<ConfigWatch>,
        mut sync_received: Option<mpsc::Receiver<Received>>,
    ) -> Result<Exit> {
        // Next hops follow the kernel's events; the timer only retries what events cannot
        // bring (a neighbour that never answered).
        let mut kernel = KernelChanges::subscribe()?;
        let mut refresh = tokio::time::interval(Duration::from_secs(10));
        let mut view_tick = tokio::time::interval(VIEW_TICK);
        let mut config_tick = tokio::time::interval(ConfigWatch::INTERVAL);
        let mut rest_tick = tokio::time::interval(REST_TICK);
        let mut sync_refresh = tokio::time::interval(
            self.config
                .sync
                .as_ref()
                .map_or(Duration::from_secs(3600), |s| s.refresh),
        );
        loop {
            tokio::select! {
                _ = sync_refresh.tick(), if self.sync.is_some() => self.share_exceptions(),
                Some(received) = async { sync_received.as_mut()?.recv().await } => {
                    self.take_received(received);
                }
                _ = view_tick.tick(), if self.view_stale => self.publish(),
                _ = rest_tick.tick() => {
                    if self.blocks.expire(Instant::now()) {
                        info!("an egress block's rest ended: it goes to its new owner");
                        self.converge();
                    }
                }
                _ = signals.hangup.recv() => {
                    if let Some(w) = &mut config_watch {
                        w.sync();
                    }
                    self.reload().await;
                }
                _ = config_tick.tick(), if config_watch.is_some() => {
                    if config_watch.as_mut().is_some_and(ConfigWatch::changed) {
                        info!(path = %self.path.display(), "the config file changed: reloading");
                        self.reload().await;
                    }
                }
                Some(()) = kernel.next() => self.refresh_next_hops().await,
                _ = refresh.tick() => self.refresh_next_hops().await,
                Some(observation) = async { observations.as_mut()?.recv().await } => {
                    self.observe(observation);
                }
                Some(command) = commands.recv() => {
                    let response = self.drain(command.drain, command.target);
                    let _ = command.reply.send(response);
                }
                result = &mut *metrics_server => {
                    anyhow::bail!("the metrics server stopped: {result:?}");
                }
                _ = signals.terminate.recv() => return Ok(Exit::Stop),
                _ = signals.interrupt.recv() => return Ok(Exit::Stop),
                _ = signals.restart.recv() => return Ok(Exit::Restart),
            }
        }
    }

    /// Stops announcing (with the drain time), and with `cleanup` removes vip from the node;
    /// for a restart, leaves announcements and datapath to the next agent.
    async fn stop(mut self, cleanup: bool, exit: Exit) -> Result<()> {
        if exit == Exit::Restart {
            if let Some(announcer) = self.announcer {
                announcer.restart().await;
            }
            if cleanup {
                warn!("restarting: --cleanup does not apply, the datapath keeps forwarding");
            }
            info!("restarting; the datapath keeps forwarding for the next agent");
            return Ok(());
        }
        if let Some(announcer) = self.announcer {
            announcer.stop(announce::drain_time(&self.config)).await;
        }
        let pin_dir = self.config.node.pin_dir.clone();
        if let (true, Node::Backend(backend)) = (cleanup, &mut self.node) {
            backend.remove_source_nat()?;
        }
        drop(self.node);
        if cleanup {
            self.lo.sync(&[]).await?;
            let ifaces = detach_all(&pin_dir)?;
            info!(?ifaces, "detached, removed pins and VIP addresses");
        } else {
            info!(
                "stopping; the datapath keeps forwarding (use --cleanup or `vip-agent detach` to remove it)"
            );
        }
        Ok(())
    }

    /// What BGP announces now: VIPs in the datapath with a backend that takes new flows; with
    /// the GRACEFUL_SHUTDOWN community while the node is drained.
    fn routes(&self) -> Vec<Route> {
        let routes = match &self.node {
            Node::Lb(lb) => bgp::routes_for(&self.config, |k| lb.applied.forwardable(k)),
            Node::Backend(_) => Vec::new(),
        };
        self.drained_routes(routes)
    }

    fn drained_routes(&self, mut routes: Vec<Route>) -> Vec<Route> {
        if self.node_drained {
            for r in &mut routes {
                r.communities.push(bgp::session::GRACEFUL_SHUTDOWN);
            }
        }
        routes
    }

    fn announce(&self) {
        if let Some(announcer) = &self.announcer {
            announcer.announce(self.routes());
        }
    }

    fn publish(&mut self) {
        self.view_stale = false;
        let accounts: Vec<VipAccount> = match &self.node {
            Node::Lb(lb) => lb.applied.accounts(),
            Node::Backend(_) => Vec::new(),
        };
        let forwardable = self
            .config
            .vips
            .iter()
            .map(|v| {
                let up = match &self.node {
                    Node::Lb(lb) => lb.applied.forwardable(&v.key()),
                    Node::Backend(_) => false,
                };
                (v.name(), up)
            })
            .collect();
        let since_epoch = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        self.view.send_replace(View {
            ready: self.ready,
            attached: self.attached.clone(),
            node_drained: self.node_drained,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_reload: self.last_reload.map(|(t, ok)| (since_epoch(t), ok)),
            forwardable,
            backends: self.status.views(&self.config),
            accounts,
            egress: self.egress_view(),
        });
    }

    /// Scans conntrack for the flows the current tables would send elsewhere and hands them
    /// to flow-state sharing, which pushes them to every peer.
    fn share_exceptions(&self) {
        let (Some(sync), Node::Lb(lb)) = (&self.sync, &self.node) else {
            return;
        };
        let started = Instant::now();
        match lb.dataplane.flows() {
            Ok(flows) => {
                let entries =
                    exceptions::exceptions(&lb.applied.lookup(), &flows, exceptions::now_ns());
                debug!(
                    flows = flows.len(),
                    exceptions = entries.len(),
                    took = ?started.elapsed(),
                    "conntrack scanned for exceptions"
                );
                sync.publish(entries);
            }
            Err(e) => warn!(error = %crate::errors::chain(&e), "scanning conntrack"),
        }
    }

    /// Writes what a peer pushed into conntrack, where this node has the flow's VIP and
    /// backend and does not track the flow itself.
    fn take_received(&mut self, received: Received) {
        let (Some(sync), Node::Lb(lb)) = (&self.sync, &mut self.node) else {
            return;
        };
        let Received::Entries { from, entries } = received else {
            return;
        };
        let lookup = lb.applied.lookup();
        let now = exceptions::now_ns();
        let mut applied = 0;
        let mut rejected: HashMap<&'static str, u64> = HashMap::new();
        for e in &entries {
            let dataplane = &lb.dataplane;
            let local = |flow: &_| dataplane.conntrack(flow).ok().flatten();
            match exceptions::entry_for(&lookup, e, local, now) {
                Ok((flow, entry)) => match lb.dataplane.insert_flow(&flow, &entry) {
                    Ok(()) => applied += 1,
                    Err(e) => warn!(error = %crate::errors::chain(&e), "writing a peer's flow"),
                },
                Err(reason) => *rejected.entry(reason).or_default() += 1,
            }
        }
        let rejected: Vec<(&'static str, u64)> = rejected.into_iter().collect();
        debug!(peer = %from, applied, ?rejected, "flow state from a peer");
        sync.counters.applied(applied, &rejected);
    }

    /// At start: waits until every peer has pushed all its exceptions (or `fetch_timeout`),
    /// writing them as they come, so that flows moved here find their backends from the
    /// first packet this node is announced for.
    async fn fetch_exceptions(&mut self, received: &mut mpsc::Receiver<Received>) {
        let Some(sync) = &self.sync else {
            return;
        };
        let mut waiting: HashSet<IpAddr> = sync.peers().iter().copied().collect();
        let counters = sync.counters.clone();
        let Some(wait) = self.config.sync.as_ref().map(|s| s.fetch_timeout) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + wait;
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, received.recv()).await {
                Ok(Some(Received::Synced { from })) => {
                    waiting.remove(&from);
                }
                Ok(Some(entries)) => self.take_received(entries),
                Ok(None) | Err(_) => break,
            }
        }
        if waiting.is_empty() {
            info!("every peer's flow state is here");
        } else {
            warn!(missing = ?waiting, ?wait, "announcing without these peers' flow state");
            counters.started_without(waiting);
        }
    }

    /// The egress blocks: all of them on a load balancer, a backend's own on a backend.
    fn egress_view(&self) -> Vec<crate::view::EgressBlockView> {
        let now = Instant::now();
        match &self.node {
            Node::Lb(lb) => crate::view::EgressBlockView::all(
                &self.config.egress,
                &self.blocks,
                now,
                |vip, owner| {
                    lb.applied
                        .backend_id(&(crate::apply::encode::egress_key(vip), owner))
                },
            ),
            Node::Backend(_) => {
                let own = self
                    .config
                    .backend
                    .as_ref()
                    .map_or(&[][..], |b| &b.addresses[..]);
                crate::view::EgressBlockView::all(&self.config.egress, &self.blocks, now, |_, _| {
                    None
                })
                .into_iter()
                .filter(|b| b.owner.is_some_and(|o| own.contains(&o)))
                .collect()
            }
        }
    }

    /// Makes the maps hold what the config and the backends' status say, then announces:
    /// after health, drain and next-hop changes, which change backends of configured VIPs.
    fn converge(&mut self) {
        let now = Instant::now();
        match &mut self.node {
            Node::Lb(lb) => match lb.write(&self.status.target(&self.config, &self.blocks, now)) {
                Ok(report) => {
                    self.ready = true;
                    debug!(?report, "maps updated");
                }
                Err(e) => {
                    self.ready = false;
                    error!(error = %crate::errors::chain(&e), "updating the maps");
                }
            },
            Node::Backend(backend) => {
                if let Err(e) = backend.sync_source_nat(&self.config, &self.blocks, now) {
                    error!(error = %crate::errors::chain(e.as_ref()), "egress source NAT");
                }
            }
        }
        self.share_exceptions();
        self.announce();
        self.publish();
    }

    fn observe(&mut self, o: Observation) {
        let detail = o.detail();
        let Some(up) = self.status.record(
            &o.key,
            o.result.is_ok(),
            detail.clone(),
            o.latency,
            Instant::now(),
        ) else {
            // No change of verdict: only the latest check to show, published with the next
            // view tick rather than a whole view per check.
            self.view_stale = true;
            return;
        };
        let vip = VipName::of(&o.key.0).map_or_else(String::new, |n| n.to_string());
        if up {
            info!(%vip, backend = %o.key.1, reason = %detail, "backend up");
        } else {
            warn!(%vip, backend = %o.key.1, reason = %detail, "backend down");
        }
        self.converge();
    }

    async fn refresh_next_hops(&mut self) {
        if let Node::Lb(lb) = &mut self.node {
            match lb.resolve(&self.config).await {
                Ok(false) => {}
                Ok(true) => {
                    info!("next hops changed");
                    self.converge();
                }
                Err(e) => warn!(error = %crate::errors::chain(e.as_ref()), "resolving next hops"),
            }
        }
    }

    /// A run-time drain or undrain of backends (of every VIP, or of one) or of the node.
    fn drain(&mut self, drained: bool, target: DrainTarget) -> Response {
        if target.backends.is_empty() {
            self.node_drained = drained;
            info!(drained, "node drain");
            self.announce();
            self.publish();
            return Response::Drain(DrainOutcome {
                drained,
                backends: Vec::new(),
                vips: Vec::new(),
            });
        }
        let mut keys = Vec::new();
        let mut vips = Vec::new();
        for vip in &self.config.vips {
            if target.vip.is_some_and(|a| a != vip.address) {
                continue;
            }
            let named: Vec<_> = vip
                .backends
                .iter()
                .filter(|b| target.backends.contains(&b.address))
                .map(|b| (vip.key(), b.address))
                .collect();
            if !named.is_empty() {
                vips.push(vip.to_string());
                keys.extend(named);
            }
        }
        if keys.is_empty() {
            let names: Vec<String> = target.backends.iter().map(IpAddr::to_string).collect();
            return Response::Refused(format!("no VIP has backend {}", names.join(" or ")));
        }
        self.status.set_drained(&keys, drained);
        info!(backends = ?target.backends, drained, count = keys.len(), "backend drain");
        self.converge();
        Response::Drain(DrainOutcome {
            drained,
            backends: target.backends,
            vips,
        })
    }

    /// SIGHUP: a new config, validated whole and planned whole; a bad one changes nothing.
    async fn reload(&mut self) {
        // 1. Validate.
        let new = match config::load(&self.path) {
            Ok(new) => new,
            Err(e) => return self.refuse(&e, "reload rejected; the running config stays"),
        };
        let restart = self.config.restart_needed(&new);
        if !restart.is_empty() {
            self.reloads_failed += 1;
            self.last_reload = Some((std::time::SystemTime::now(), false));
            self.publish();
            error!(
                keys = restart.join(", "),
                "reload refused: these settings changed and only a restart applies them; nothing applied"
            );
            return;
        }
        // 2. Plan. Run-time drains end with a reload; health verdicts stay; egress blocks
        // whose backend left start resting.
        let now = Instant::now();
        let mut status = self.status.clone();
        status.sync(&new, false, now);
        let mut blocks = self.blocks.clone();
        blocks.change(&self.config.egress, &new.egress, now);
        let plan = match &self.node {
            Node::Lb(lb) => match lb.plan(&status.target(&new, &blocks, now)) {
                Ok(plan) => Some(plan),
                Err(e) => return self.refuse(&e, "reload refused; nothing was changed"),
            },
            Node::Backend(_) => None,
        };
        // 3. Withdraw what will not be forwardable.
        let after = match &plan {
            Some(plan) => bgp::routes_for(&new, |k| plan.forwardable(k)),
            None => Vec::new(),
        };
        self.withdraw_all_but(&after).await;
        // 4. Write the maps.
        if let Err(e) = self.write(plan, &new, &blocks) {
            self.ready = false;
            self.refuse(
                e.as_ref(),
                "reload failed while writing; fix and reload again",
            );
            self.announce();
            return;
        }
        self.config = new;
        self.status = status;
        self.blocks = blocks;
        self.node_drained = false;
        self.ready = true;
        self.share_exceptions();
        // 5. Announce, with the sessions' new settings.
        self.announce();
        if let Some(announcer) = &mut self.announcer
            && let Err(e) = announcer.reconfigure(&self.config).await
        {
            error!(error = %crate::errors::chain(&e), "applying the BGP settings");
        }
        // 6. `lo`, and the health checks of the new config.
        match self.lo.sync(&self.config.loopback_addresses()).await {
            Ok((added, removed)) => info!(added, removed, "reloaded"),
            Err(e) => error!(error = %crate::errors::chain(&e), "updating VIP addresses on lo"),
        }
        if let Node::Lb(lb) = &mut self.node
            && let Err(e) = lb.sync_checks(&self.config)
        {
            error!(error = %crate::errors::chain(e.as_ref()), "health checks");
        }
        self.reloads_ok += 1;
        self.last_reload = Some((std::time::SystemTime::now(), true));
        self.publish();
    }

    fn refuse(&mut self, error: &(dyn std::error::Error + 'static), what: &str) {
        self.reloads_failed += 1;
        self.last_reload = Some((std::time::SystemTime::now(), false));
        self.publish();
        error!(error = %crate::errors::chain(error), "{what}");
    }

    fn write(&mut self, plan: Option<Plan>, new: &Config, blocks: &egress::Blocks) -> Result<()> {
        match (&mut self.node, plan) {
            (Node::Lb(lb), Some(plan)) => {
                let report = lb.execute(plan)?;
                info!(?report, "config applied");
            }
            (Node::Backend(backend), _) => {
                backend.configure(new)?;
                backend.sync_source_nat(new, blocks, Instant::now())?;
            }
            (Node::Lb(_), None) => {}
        }
        Ok(())
    }

    /// Withdraws the announced routes that `after` lacks, first announcing them with
    /// GRACEFUL_SHUTDOWN for the drain time when one is set, and waits until the sessions
    /// have sent the withdrawal.
    async fn withdraw_all_but(&self, after: &[Route]) {
        let Some(announcer) = &self.announcer else {
            return;
        };
        let staying: HashSet<IpAddr> = after.iter().map(|r| r.prefix).collect();
        let now = announcer.routes();
        if now.iter().all(|r| staying.contains(&r.prefix)) {
            return;
        }
        let drain = announce::drain_time(&self.config);
        if !drain.is_zero() {
            let draining = now
                .iter()
                .cloned()
                .map(|mut r| {
                    if !staying.contains(&r.prefix)
                        && !r.communities.contains(&bgp::session::GRACEFUL_SHUTDOWN)
                    {
                        r.communities.push(bgp::session::GRACEFUL_SHUTDOWN);
                    }
                    r
                })
                .collect();
            info!(?drain, "routes leaving: GRACEFUL_SHUTDOWN first");
            announcer.announce(draining);
            tokio::time::sleep(drain).await;
        }
        let kept = now
            .into_iter()
            .filter(|r| staying.contains(&r.prefix))
            .collect();
        announcer.announce(kept);
        announcer.sent(Duration::from_secs(1)).await;
    }
}
