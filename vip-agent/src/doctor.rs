//! `vip-agent doctor`: what this host has of what vip needs, and what the field's guides say
//! matters, each finding with the command that fixes it. It reads only: nothing is changed,
//! loaded or attached.

use std::{fmt, path::Path};

use crate::config::{Config, Role};

/// How a finding stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, but not as well as it could.
    Warn,
    /// vip will not work (or not as configured).
    Fail,
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    pub what: String,
    /// The command or setting that fixes it.
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{mark} {}", self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n     fix: {fix}")?;
        }
        Ok(())
    }
}

fn ok(what: String) -> Finding {
    Finding {
        verdict: Verdict::Ok,
        what,
        fix: None,
    }
}

fn problem(verdict: Verdict, what: String, fix: String) -> Finding {
    Finding {
        verdict,
        what,
        fix: Some(fix),
    }
}

/// Every finding for a node that runs `config`.
pub fn examine(config: &Config) -> Vec<Finding> {
    let mut out = vec![kernel(), btf(), bpffs(&config.node.pin_dir)];
    for iface in &config.node.interfaces {
        out.push(interface(iface));
    }
    match config.node.role {
        Role::Lb => {
            for iface in &config.node.interfaces {
                out.push(forwarding(iface));
            }
            out.push(multipath_hash());
        }
        Role::Backend => {
            for iface in &config.node.interfaces {
                out.extend(backend_sysctls(iface));
            }
        }
    }
    if let Some(bgp) = &config.bgp {
        if bgp.listen {
            out.push(port_free("tcp", 179, "BGP (listen or a passive peer)"));
        }
        if bgp.peers.iter().any(|p| p.bfd) {
            out.push(port_free("udp", crate::bfd::PORT, "BFD"));
        }
    }
    out.push(port_free(
        "tcp",
        config.node.metrics_address.port(),
        "the metrics listener",
    ));
    out
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn kernel() -> Finding {
    let release = read("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    // 6.1: VIP addresses on lo carry vip's IFA_PROTO; 5.11 and later charge BPF memory to
    // the cgroup (no RLIMIT_MEMLOCK) and have bpf_ktime_get_coarse_ns.
    if version >= (6, 1) {
        ok(format!("kernel {release}"))
    } else if version >= (5, 11) {
        problem(
            Verdict::Warn,
            format!("kernel {release}: before 6.1, VIP addresses on lo are not marked as vip's"),
            "a kernel 6.1 or newer".into(),
        )
    } else {
        problem(
            Verdict::Fail,
            format!("kernel {release}: the datapath needs 5.11 or newer"),
            "a kernel 6.1 or newer".into(),
        )
    }
}

fn btf() -> Finding {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        ok("kernel BTF at /sys/kernel/btf/vmlinux".into())
    } else {
        problem(
            Verdict::Warn,
            "no kernel BTF: bpftool cannot name the maps' fields".into(),
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y".into(),
        )
    }
}

/// bpffs where the pins go.
fn bpffs(pin_dir: &Path) -> Finding {
    let mount = pin_dir
        .ancestors()
        .find(|p| is_bpffs(p))
        .map(Path::to_path_buf);
    match mount {
        Some(m) => ok(format!(
            "bpffs at {} (pins under {})",
            m.display(),
            pin_dir.display()
        )),
        None => problem(
            Verdict::Fail,
            format!(
                "no bpffs holds {}: pins, and hitless restarts, need one",
                pin_dir.display()
            ),
            "mount -t bpf bpf /sys/fs/bpf (and in /etc/fstab: bpf /sys/fs/bpf bpf defaults 0 0)"
                .into(),
        ),
    }
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct for a valid C path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == BPF_FS_MAGIC }
}

/// Drivers with native (driver-mode) XDP, as far as vip has seen them work.
const NATIVE_XDP: &[&str] = &[
    "veth",
    "virtio_net",
    "mlx5_core",
    "mlx4_en",
    "ice",
    "i40e",
    "ixgbe",
    "igb",
    "igc",
    "bnxt_en",
    "ena",
    "nfp",
    "qede",
    "tun",
    "gve",
    "sfc",
    "mana",
];

fn interface(iface: &str) -> Finding {
    let Some(driver) = driver(iface) else {
        return problem(
            Verdict::Fail,
            format!("interface {iface} does not exist here"),
            "name an existing interface in node.interfaces (ip link show)".into(),
        );
    };
    if NATIVE_XDP.contains(&driver.as_str()) {
        ok(format!("{iface}: driver {driver} has native XDP"))
    } else {
        problem(
            Verdict::Warn,
            format!("{iface}: driver {driver} may lack native XDP (generic mode is much slower)"),
            "see the driver's documentation; node.attach = \"generic\" runs anyway".into(),
        )
    }
}

/// The interface's driver (ethtool's, in this network namespace); `None` if there is no
/// such interface.
fn driver(iface: &str) -> Option<String> {
    /// `struct ethtool_drvinfo` (linux/ethtool.h), up to the fields read.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let name = std::ffi::CString::new(iface).ok()?;
    if name.as_bytes().len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked) and ifr_data points at `info`,
    // which outlives the ioctl.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if socket < 0 {
            return None;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = std::ptr::from_mut(&mut info).cast();
        let rc = libc::ioctl(socket, SIOCETHTOOL, &mut req);
        libc::close(socket);
        if rc != 0 {
            // No such device; or a device without ethtool support (it exists, driver unknown).
            let exists = libc::if_nametoindex(name.as_ptr()) != 0;
            return exists.then(|| "unknown".into());
        }
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

fn sysctl(path: &str) -> Option<i64> {
    read(format!("/proc/sys/{path}"))?.parse().ok()
}

fn forwarding(iface: &str) -> Finding {
    let on = ["ipv4", "ipv6"]
        .iter()
        .all(|f| sysctl(&format!("net/{f}/conf/{iface}/forwarding")) == Some(1));
    if on {
        ok(format!("{iface}: forwarding on"))
    } else {
        problem(
            Verdict::Warn,
            format!(
                "{iface}: forwarding off (bpf_fib_lookup answers only on forwarding interfaces; the agent turns it on where /proc/sys is writable)"
            ),
            format!(
                "sysctl -w net.ipv4.conf.{iface}.forwarding=1 net.ipv6.conf.{iface}.forwarding=1"
            ),
        )
    }
}

fn multipath_hash() -> Finding {
    let policy = sysctl("net/ipv4/fib_multipath_hash_policy").unwrap_or(0);
    let routes = sysctl("net/ipv4/ip_forward") == Some(1);
    if !routes || policy == 1 {
        ok(format!("fib_multipath_hash_policy {policy}"))
    } else {
        problem(
            Verdict::Warn,
            "this node routes with fib_multipath_hash_policy 0: ECMP it does itself hashes on addresses only".into(),
            "sysctl -w net.ipv4.fib_multipath_hash_policy=1 net.ipv6.fib_multipath_hash_policy=1"
                .into(),
        )
    }
}

/// What backends behind DSR need: loose or no rp_filter on the interface the encapsulated
/// packets arrive on, and no ARP answers for the VIPs on `lo`.
fn backend_sysctls(iface: &str) -> Vec<Finding> {
    let effective = |knob: &str| {
        let all = sysctl(&format!("net/ipv4/conf/all/{knob}")).unwrap_or(0);
        let this = sysctl(&format!("net/ipv4/conf/{iface}/{knob}")).unwrap_or(0);
        all.max(this)
    };
    let mut out = Vec::new();
    let rp = effective("rp_filter");
    out.push(if rp == 1 {
        problem(
            Verdict::Fail,
            format!("{iface}: rp_filter strict: clients' packets for a VIP on lo are dropped"),
            format!("sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{iface}.rp_filter=2"),
        )
    } else {
        ok(format!("{iface}: rp_filter {rp}"))
    });
    let (ignore, announce) = (effective("arp_ignore"), effective("arp_announce"));
    out.push(if ignore >= 1 && announce >= 2 {
        ok(format!("{iface}: arp_ignore {ignore}, arp_announce {announce}"))
    } else {
        problem(
            Verdict::Fail,
            format!("{iface}: arp_ignore {ignore}, arp_announce {announce}: this host answers ARP for the VIPs on lo and steals their traffic"),
            "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2".into(),
        )
    });
    out
}

/// Whether a port is free, and who holds it if not.
fn port_free(protocol: &str, port: u16, purpose: &str) -> Finding {
    match holder(protocol, port) {
        None => ok(format!("{protocol} port {port} free ({purpose})")),
        Some(who) => problem(
            Verdict::Fail,
            format!("{protocol} port {port} ({purpose}) is taken by {who}"),
            format!("stop {who}, or move vip's {purpose} elsewhere"),
        ),
    }
}

/// The process bound to `port` (a listening TCP socket, or a UDP socket), from /proc.
fn holder(protocol: &str, port: u16) -> Option<String> {
    let inodes: Vec<String> = ["", "6"]
        .iter()
        .filter_map(|v| read(format!("/proc/net/{protocol}{v}")))
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
                    // TCP: listening (0A) only; UDP: any bound socket.
                    let listening = protocol == "udp" || f.get(3) == Some(&"0A");
                    (local_port == port && listening).then(|| f.get(9).map(|s| (*s).to_owned()))?
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let owns = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| wanted.iter().any(|w| l.as_os_str() == w.as_str()))
        });
        if owns {
            let name = read(entry.path().join("comm")).unwrap_or_default();
            return Some(format!("{name} (pid {pid})"));
        }
    }
    Some("a process of another namespace or user".into())
}
