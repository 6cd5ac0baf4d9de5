//! `vip-agent`: runs vip's datapath on a load-balancer node or a backend, and looks inside it.
//! This file is the command line and its dispatch; the work is in the library's modules.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use vip_agent::{
    config,
    control::{self, DrainTarget, Request, Response},
    dataplane::{detach_all, log as datapath_log},
    doctor,
    inspect::{self, Output},
    runtime::{self, RunOptions},
};

#[derive(Parser)]
#[command(version, about = "vip: an XDP layer-4 load balancer")]
struct Cli {
    /// The running agent's control socket (its `node.control_socket`).
    #[arg(long, global = true, env = "VIP_SOCKET", default_value = config::DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    /// Log lines as text, or as one JSON object each (for log shippers).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "VIP_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct DrainArgs {
    /// A backend's address; repeat it for a host's other addresses (IPv4 and IPv6).
    #[arg(long = "backend")]
    backends: Vec<IpAddr>,
    #[arg(long)]
    vip: Option<IpAddr>,
}

impl From<DrainArgs> for DrainTarget {
    fn from(a: DrainArgs) -> Self {
        DrainTarget {
            backends: a.backends,
            vip: a.vip,
        }
    }
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
        /// Reload when the config file changes (checked every 2 s; a Kubernetes ConfigMap
        /// update needs no SIGHUP).
        #[arg(long)]
        watch_config: bool,
    },
    /// Validate a config file without touching the system.
    CheckConfig {
        file: PathBuf,
        /// Print the config as the agent would run it (JSON: `${NAME}` expanded, defaults
        /// filled in, passwords shown only as present or not).
        #[arg(long)]
        print_effective: bool,
    },
    /// Detach the datapath from every interface and remove its pins.
    Detach {
        #[arg(long, default_value = "/sys/fs/bpf/vip")]
        pin_dir: PathBuf,
    },
    /// Show VIPs, backends and counters from the pinned maps, and the running agent's state.
    Status {
        #[arg(long, default_value = "/sys/fs/bpf/vip")]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The connection-tracking entries, decoded.
    Flows {
        #[arg(long, default_value = "/sys/fs/bpf/vip")]
        pin_dir: PathBuf,
        /// Only flows to this VIP address.
        #[arg(long)]
        vip: Option<IpAddr>,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Which backend a flow goes to, found by running a packet of that flow through the loaded
    /// program (BPF_PROG_TEST_RUN). A conntrack entry the probe makes is removed again.
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
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Drain at run time: a backend (no new flows; established ones continue), of every VIP
    /// or of `--vip`; without `--backend`, the whole node (BGP GRACEFUL_SHUTDOWN). Lasts until
    /// `undrain`, a reload or a restart.
    Drain(DrainArgs),
    /// Ends a run-time drain.
    Undrain(DrainArgs),
    /// The running agent's backends: condition and latest health check.
    Backends {
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Check this host for what vip needs (kernel, bpffs, drivers, sysctls, ports), with the
    /// fix for each problem. Reads only. Exits 1 when something would stop vip.
    Doctor {
        #[arg(long, default_value = "/etc/vip/vip.toml")]
        config: PathBuf,
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
    // Output to a closed pipe (`vip-agent status | head`) ends the program quietly, as it does
    // any Unix tool, instead of a panic in `print!`.
    // SAFETY: restoring the default disposition of a signal, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info".into())
        // netlink-packet-route warns on every link dump that this kernel is newer than it
        // knows: noise, whatever RUST_LOG says.
        .add_directive(
            "netlink_packet_route=error"
                .parse()
                .expect("a valid directive"),
        );
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
    // Logs go to stderr, coloured only for a terminal.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
    let socket = cli.socket;
    match cli.command {
        Command::Run {
            config,
            cleanup,
            netns,
            datapath_log,
            watch_config,
        } => {
            if let Some(ns) = netns {
                // Before the runtime exists: its threads inherit this thread's namespace; and
                // before the config, whose "auto" addresses are this namespace's.
                enter_netns(&ns)?;
            }
            let cfg = config::load(&config)?;
            let options = RunOptions {
                config_path: config,
                cleanup,
                datapath_log,
                watch_config,
            };
            match tokio::runtime::Runtime::new()?.block_on(runtime::run(options, cfg))? {
                runtime::Exit::Stop => Ok(()),
                runtime::Exit::Restart => std::process::exit(runtime::RESTART_EXIT_STATUS),
            }
        }
        Command::CheckConfig {
            file,
            print_effective,
        } => {
            let cfg = config::load(&file)?;
            if print_effective {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
                return Ok(());
            }
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
        Command::Status { pin_dir, output } => {
            let agent = control::client::request(&socket, &Request::Status)
                .map_err(|e| format!("{:#}", anyhow::Error::from(e)));
            inspect::status(&pin_dir, output, &agent)?;
            if output == Output::Text {
                match agent {
                    Ok(answer) => print!("agent:\n{}", indent(&answer.to_string())),
                    Err(e) => println!("agent: {e}"),
                }
            }
            Ok(())
        }
        Command::Flows {
            pin_dir,
            vip,
            output,
        } => inspect::flows(&pin_dir, vip, output),
        Command::Which {
            pin_dir,
            vip,
            flow,
            protocol,
            output,
        } => inspect::which(&pin_dir, vip, flow, &protocol, output),
        Command::Doctor { config } => {
            let cfg = config::load(&config)?;
            let findings = doctor::examine(&cfg);
            for f in &findings {
                println!("{f}");
            }
            let failed = findings.iter().any(|f| f.verdict == doctor::Verdict::Fail);
            if failed {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Maglev {
            size,
            backends,
            remove,
            add,
        } => inspect::maglev(size, &backends, &remove, &add),
        Command::Drain(args) => ask(&socket, Request::Drain(args.into()), Output::Text),
        Command::Undrain(args) => ask(&socket, Request::Undrain(args.into()), Output::Text),
        Command::Backends { output } => ask(&socket, Request::Backends, output),
    }
}

/// Sends a request to the running agent and prints its answer; a refusal is an error.
fn ask(socket: &Path, request: Request, output: Output) -> Result<()> {
    match control::client::request(socket, &request)? {
        Response::Refused(why) => bail!("the agent refused: {why}"),
        answer if output == Output::Json => {
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        answer => {
            print!("{answer}");
            Ok(())
        }
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
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
