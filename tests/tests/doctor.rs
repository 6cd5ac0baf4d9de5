//! `vip-agent doctor` in network namespaces set up wrong, then right: each problem is found,
//! with its fix, and a host without problems passes.

use std::process::{Command, Output};

use vip_tests::node::{Netns, agent_bin};

/// `vip-agent doctor --config FILE` in `ns`'s network (the host's mounts, where bpffs is).
fn doctor(ns: &Netns, config: &str) -> (bool, String) {
    let path = std::env::temp_dir().join(format!("{}-doctor.toml", ns.name));
    std::fs::write(&path, config).unwrap();
    let out: Output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(agent_bin())
        .args(["doctor", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn host(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns
}

fn sysctl(ns: &Netns, settings: &[&str]) {
    let mut cmd = vec!["sysctl", "-qw"];
    cmd.extend_from_slice(settings);
    ns.exec(&cmd);
}

#[test]
fn a_backend_with_strict_rp_filter_and_arp_answers_fails_until_fixed() {
    let ns = host("doc-be");
    let config = "[node]\nrole = \"backend\"\ninterfaces = [\"eth0\"]\n\
                  [backend]\naddresses = [\"192.0.2.11\"]\nvips = [\"198.51.100.1\"]\n";
    sysctl(
        &ns,
        &[
            "net.ipv4.conf.all.rp_filter=1",
            "net.ipv4.conf.eth0.rp_filter=1",
            "net.ipv4.conf.all.arp_ignore=0",
            "net.ipv4.conf.all.arp_announce=0",
        ],
    );
    let (passed, report) = doctor(&ns, config);
    assert!(!passed, "{report}");
    assert!(report.contains("FAIL eth0: rp_filter strict"), "{report}");
    assert!(
        report.contains("net.ipv4.conf.eth0.rp_filter=2"),
        "{report}"
    );
    assert!(
        report.contains("FAIL eth0: arp_ignore 0, arp_announce 0"),
        "{report}"
    );
    assert!(
        report.contains("ok   eth0: driver veth has native XDP"),
        "{report}"
    );
    assert!(report.contains("ok   bpffs at /sys/fs/bpf"), "{report}");

    sysctl(
        &ns,
        &[
            "net.ipv4.conf.all.rp_filter=2",
            "net.ipv4.conf.eth0.rp_filter=2",
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ],
    );
    let (passed, report) = doctor(&ns, config);
    assert!(passed, "{report}");
    assert!(!report.contains("FAIL"), "{report}");
}

#[test]
fn an_lb_node_without_forwarding_with_a_taken_bgp_port_is_told_so() {
    let ns = host("doc-lb");
    let config = "[node]\ninterfaces = [\"eth0\", \"eth9\"]\nsource_v4 = \"198.18.0.2\"\n\
                  [bgp]\nasn = 65001\nrouter_id = \"198.18.0.2\"\nlisten = true\n\
                  [[bgp.peer]]\naddress = \"198.18.0.1\"\nasn = 65000\n";
    sysctl(
        &ns,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.eth0.forwarding=0",
            "net.ipv4.fib_multipath_hash_policy=0",
        ],
    );
    // Another BGP speaker on port 179: this test process.
    let _bgp = ns.within(|| std::net::TcpListener::bind("0.0.0.0:179").expect("bind 179"));
    let (passed, report) = doctor(&ns, config);
    assert!(!passed, "{report}");
    assert!(
        report.contains("FAIL interface eth9 does not exist here"),
        "{report}"
    );
    assert!(report.contains("warn eth0: forwarding off"), "{report}");
    assert!(
        report.contains("net.ipv4.conf.eth0.forwarding=1"),
        "{report}"
    );
    assert!(
        report.contains("warn this node routes with fib_multipath_hash_policy 0"),
        "{report}"
    );
    assert!(
        report.contains("tcp port 179 (BGP (listen or a passive peer)) is taken by")
            && report.contains(&format!("(pid {})", std::process::id())),
        "{report}"
    );
}

/// A host without bpffs (a mount namespace where it is unmounted): doctor says so, with the
/// mount command.
#[test]
fn a_host_without_bpffs_is_told_to_mount_it() {
    let ns = host("doc-bpffs");
    let config = std::env::temp_dir().join(format!("{}-bpffs.toml", ns.name));
    std::fs::write(
        &config,
        "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"198.18.0.2\"\n",
    )
    .unwrap();
    let script = format!(
        "while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf; done; \
         exec nsenter --net=/run/netns/{} {} doctor --config {}",
        ns.name,
        agent_bin().display(),
        config.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&config);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains("FAIL no bpffs holds /sys/fs/bpf/vip"),
        "{report}"
    );
    assert!(report.contains("mount -t bpf bpf /sys/fs/bpf"), "{report}");
}
