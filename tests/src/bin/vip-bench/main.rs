//! `cargo xtask bench`: ns per packet of the datapath with BPF_PROG_TEST_RUN, the control plane
//! and the lab, written to BENCHMARKS.md.
//!
//! With `repeat`, the kernel runs every iteration on the same buffer, so from the second
//! iteration on a program would see its own encapsulated output. Each case therefore runs
//! behind the harness's `bench_restore` wrapper, which copies the input frame back and
//! tail-calls the program under test. The wrapper's own cost is measured in the same run (the
//! trivial XDP_TX program with and without the wrapper) and subtracted. Every case's output
//! after the timed runs is checked against a plain single run of the same frame.

mod agent;
mod cpus;
mod datapath;
mod egress;
mod harness;
mod lab;
mod leave;
mod maglev;
mod scaling;
mod sharing;

use std::{fmt::Write as _, path::PathBuf, process::Command};

use clap::{Parser, ValueEnum};

/// Sections beyond the datapath cases and table scaling, which always run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    Maglev,
    Lab,
    Startup,
    ControlPlane,
    Failover,
}

#[derive(Parser)]
#[command(about = "vip's benchmarks (run as root)")]
struct Args {
    /// Where the report goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
    /// Only this section besides the datapath cases, for working on one.
    #[arg(long)]
    only: Option<Section>,
    /// Time this build against another vip-ebpf object, case by case, and stop.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Time one case (by its name) over and over and stop, for `perf record -a`.
    #[arg(long)]
    spin: Option<String>,
    /// Timed runs of `--spin` (400: about ten seconds).
    #[arg(long, default_value_t = 400)]
    runs: u32,
}

fn main() {
    let args = Args::parse();
    vip_tests::require_root();
    let mut services = datapath::configured();
    let mut harness = harness::Harness::load();
    if let Some(path) = &args.compare {
        datapath::compare(&mut harness, &mut services, path);
        return;
    }
    if let Some(case) = &args.spin {
        datapath::spin(&mut harness, &mut services, case, args.runs);
        return;
    }
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n").unwrap();
    writeln!(md, "Command: `cargo xtask bench` (run as root).  ").unwrap();
    writeln!(md, "Date: {}  ", shell("date -u +%Y-%m-%dT%H:%M:%SZ")).unwrap();
    writeln!(
        md,
        "Machine: {} cores, {}, Linux {}\n",
        shell("nproc"),
        shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs"),
        shell("uname -r")
    )
    .unwrap();
    datapath::report(&mut md, &mut harness, &mut services);
    cpus::every_cpu(&mut md, &mut services.lb);
    leave::leaving(&mut md);
    drop(services);
    egress::egress_cost(&mut md, &mut harness);
    sharing::flow_state_sharing(&mut md);
    scaling::table_scaling(&mut md, &mut harness);
    let wanted = |section| args.only.is_none_or(|only| only == section);
    if wanted(Section::Maglev) {
        maglev::maglev_builds(&mut md);
    }
    if wanted(Section::Lab) {
        lab::lab_throughput(&mut md);
    }
    if wanted(Section::Startup) {
        agent::agent_startup(&mut md);
    }
    if wanted(Section::ControlPlane) {
        agent::control_plane(&mut md);
    }
    if wanted(Section::Failover) {
        lab::failover(&mut md);
    }
    print!("{md}");
    std::fs::write(&args.output, md).expect("write BENCHMARKS.md");
    eprintln!("wrote {}", args.output.display());
}

/// A shell command's output, for the report's header.
fn shell(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
