//! `cargo xtask`: set-up, build, test, lint, run, demo and benchmark commands for vip.
//!
//! Every command that needs tools calls `setup` first, which installs only what is missing, so
//! the README's two commands work on a fresh Debian machine with root.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// bpf-linker version the eBPF toolchain recipe was verified with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and the demo use.
const APT_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "ethtool",
    "tcpdump",
    "procps",
    "bird2",
    "gobgpd",
    "frr",
    // promtool, which checks the agent's metrics.
    "prometheus",
    "iperf3",
    // The HTTPS health-check test's backend service and certificate.
    "openssl",
    // kubernetes-validate runs in a venv.
    "python3",
    "python3-venv",
];

#[derive(Parser)]
#[command(about = "vip's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum LabAction {
    Up,
    Down,
    Status,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: apt packages, nightly rust-src, clippy/rustfmt, bpf-linker.
    Setup {
        /// Only what building needs (the toolchain parts and bpf-linker): no test daemons,
        /// no validators. For container images.
        #[arg(long)]
        build_only: bool,
    },
    /// Build the eBPF objects (nightly, bpfel-unknown-none).
    BuildEbpf,
    /// Build the eBPF objects and the agent (release).
    Build,
    /// Set up, build, and run the whole test suite (needs root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// rustfmt check and clippy (stable crates, and the eBPF crate on nightly), warnings as errors.
    Lint,
    /// Measure the datapath with BPF_PROG_TEST_RUN and write BENCHMARKS.md (needs root).
    Bench,
    /// Set up, build, and run the demonstration in network namespaces (needs root).
    Demo,
    /// The demo's lab: `up` leaves it running, `down` removes everything it made (also after
    /// a crash), `status` shows it.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Build and run the agent with the given arguments (needs root).
    Run {
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup { build_only } => {
            if build_only {
                setup_toolchain()
            } else {
                setup()
            }
        }
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => build(),
        Cmd::Test { args } => {
            setup()?;
            let _bpffs = Bpffs::ensure()?;
            // The tests run the real agent binary too.
            build()?;
            let mut cmd = cargo();
            cmd.args(["test", "--release", "--workspace", "--exclude", "vip-ebpf"]);
            if !args.is_empty() {
                cmd.arg("--").args(args);
            }
            run(&mut cmd)
        }
        Cmd::Lint => lint(),
        Cmd::Demo => {
            setup()?;
            let _bpffs = Bpffs::ensure()?;
            build()?;
            vip_demo(&["demo"])
        }
        Cmd::Lab { action } => {
            let action = match action {
                LabAction::Up => {
                    setup()?;
                    Bpffs::ensure()?.keep();
                    build()?;
                    "up"
                }
                LabAction::Down => "down",
                LabAction::Status => "status",
            };
            vip_demo(&["lab", action])
        }
        Cmd::Bench => {
            setup()?;
            let _bpffs = Bpffs::ensure()?;
            // The lab part runs the agent and the lab's services.
            build()?;
            run(cargo().args(["build", "--release", "-p", "vip-tests", "--bin", "vip-demo"]))?;
            run(cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "vip-tests",
                    "--bin",
                    "vip-bench",
                    "--",
                ])
                .arg("--output")
                .arg(workspace().join("BENCHMARKS.md")))
        }
        Cmd::Run { args } => {
            build()?;
            Bpffs::ensure()?.keep();
            run(Command::new(workspace().join("target/release/vip-agent")).args(args))
        }
    }
}

/// Runs the lab and demo program (in the tests crate, which shares the lab with the tests).
fn vip_demo(args: &[&str]) -> Result<()> {
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "vip-tests",
            "--bin",
            "vip-demo",
            "--",
        ])
        .args(args))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace());
    cmd
}

/// `cargo +nightly` for the eBPF crate, without the variables that would break its build
/// (a set RUSTFLAGS silently replaces the target rustflags and drops `--btf`).
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &nightly(), "cargo"])
        .current_dir(workspace());
    for var in [
        "RUSTFLAGS",
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status: ExitStatus = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// How the eBPF crate is built (and linted).
const EBPF_ARGS: &[&str] = &[
    "--release",
    "-p",
    "vip-ebpf",
    "--target",
    "bpfel-unknown-none",
    "-Z",
    "build-std=core",
];

/// Packet headers are read and written with word loads only when LLVM may emit misaligned
/// accesses (headers sit at 2 mod 4), which the verifier allows for packet and map memory but
/// not for the stack. aya-log's argument encoding writes misaligned stack slots, so the object
/// the agent loads for datapath logs (`run --datapath-log`) is built without it, into its own
/// target directory.
const MISALIGNED_ACCESS: &str = r#"target.bpfel-unknown-none.rustflags=["-C", "link-arg=--cpu-features=+allows-misaligned-mem-access"]"#;

/// Where the datapath-log build of `vip-ebpf` goes (`vip-agent`'s build script looks there).
const LOG_BUILD_DIR: &str = "target/ebpf-log";

fn build_ebpf() -> Result<()> {
    run(nightly_cargo()
        .arg("build")
        .args(EBPF_ARGS)
        .args(["--config", MISALIGNED_ACCESS]))?;
    run(nightly_cargo().arg("build").args(EBPF_ARGS).args([
        "--bin",
        "vip-ebpf",
        "--target-dir",
        LOG_BUILD_DIR,
    ]))
}

fn build() -> Result<()> {
    build_ebpf()?;
    run(cargo().args(["build", "--release", "-p", "vip-agent"]))
}

fn lint() -> Result<()> {
    build_ebpf()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    run(nightly_cargo()
        .arg("clippy")
        .args(EBPF_ARGS)
        .args(["--", "-D", "warnings"]))
}

/// The nightly toolchain of the eBPF crate: `VIP_NIGHTLY` (a dated one, as the Dockerfile
/// pins), else `nightly`.
fn nightly() -> String {
    std::env::var("VIP_NIGHTLY").unwrap_or_else(|_| "nightly".into())
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    setup_toolchain()?;
    install_manifest_validator()?;
    Ok(())
}

/// The toolchain parts the build needs: nightly's rust-src, clippy and rustfmt, bpf-linker.
fn setup_toolchain() -> Result<()> {
    run(Command::new("rustup")
        .args([
            "component",
            "add",
            "rust-src",
            "clippy",
            "rustfmt",
            "--toolchain",
        ])
        .arg(nightly()))?;
    run(Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
    install_bpf_linker()
}

const BPFFS: &str = "/sys/fs/bpf";

/// bpffs at /sys/fs/bpf, which the agent and the tests pin into. Mounted here only when missing;
/// a mount made for a command that ends (tests, demo, bench) is undone when it ends, since the
/// kernel's bpf_preload pins debug iterators into every fresh bpffs that only an unmount removes.
struct Bpffs {
    mounted_here: bool,
}

impl Bpffs {
    fn ensure() -> Result<Self> {
        let mounted_here = !is_bpffs(BPFFS);
        if mounted_here {
            run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
        }
        Ok(Self { mounted_here })
    }

    /// Leaves the mount in place: for commands that leave an agent or a lab running.
    fn keep(mut self) {
        self.mounted_here = false;
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if self.mounted_here {
            let _ = Command::new("umount").arg(BPFFS).status();
        }
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_bpffs(path: &str) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some(path) && l.contains(" bpf "))
        })
        .unwrap_or(false)
}

/// kubernetes-validate (PyPI; it carries the Kubernetes schemas, so it validates offline), in a
/// venv of its own.
fn install_manifest_validator() -> Result<()> {
    let home = std::env::var("HOME").context("HOME")?;
    let venv = PathBuf::from(home).join(".cache/vip/venv");
    if venv.join("bin/kubernetes-validate").exists() {
        return Ok(());
    }
    eprintln!(
        "setup: installing kubernetes-validate in {}",
        venv.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", "kubernetes-validate"]))
}

/// bpf-linker built against nightly's own libLLVM: no LLVM download is needed (or possible).
fn install_bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = version
        && out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM");
    let sysroot = Command::new("rustc")
        .arg(format!("+{}", nightly()))
        .args(["--print", "sysroot"])
        .output()
        .context("rustc +nightly --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim());
    let libllvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .context("nightly toolchain has no libLLVM.so")?;
    let home = std::env::var("HOME").context("HOME")?;
    let prefix = PathBuf::from(home).join(".cargo/bpf-llvm");
    std::fs::create_dir_all(prefix.join("bin"))?;
    std::fs::create_dir_all(prefix.join("lib"))?;
    for link in ["libLLVM.so".to_owned(), libllvm.clone()] {
        let path = prefix.join("lib").join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(sysroot.join("lib").join(&libllvm), &path)?;
    }
    // A failing llvm-config keeps the build from finding a system LLVM of another version.
    let llvm_config = prefix.join("bin/llvm-config");
    std::fs::write(&llvm_config, "#!/bin/sh\nexit 1\n")?;
    std::fs::set_permissions(&llvm_config, std::fs::Permissions::from_mode(0o755))?;
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
            "--locked",
        ])
        .env("LLVM_PREFIX", &prefix))
}
