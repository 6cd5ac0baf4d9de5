//! The deployment files, tested as far as this machine allows: the systemd unit's commands run
//! exactly as systemd runs them, the container's entrypoint and arguments against the CLI, the
//! Kubernetes manifests validated (strict, offline schemas) and their configs and commands
//! against the agent.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use vip_tests::node::{Netns, agent, agent_bin};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `Key=value` lines of a unit file.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

/// A command line of the unit with the installed paths replaced by the test's.
fn localize(line: &str, config: &Path) -> Vec<String> {
    line.split_whitespace()
        .map(|w| match w {
            "/usr/local/bin/vip-agent" => agent_bin().to_string_lossy().into_owned(),
            "/etc/vip/vip.toml" => config.to_string_lossy().into_owned(),
            other => other.to_owned(),
        })
        .collect()
}

/// Waits up to 15 s for `ok` on the agent's answer to `GET path`.
fn wait_http(ns: &Netns, path: &str, ok: impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if ns.http_get(path).is_some_and(|r| ok(&r)) {
            return true;
        }
        thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn systemd_unit_starts_reloads_and_stops_the_agent() {
    let unit = fs::read_to_string(repo().join("deploy/systemd/vip-agent.service")).unwrap();
    let ns = Netns::new("systemd");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["link", "set", "eth1", "up"]);
    let dir = std::env::temp_dir().join(&ns.name);
    fs::create_dir_all(&dir).unwrap();
    let config = dir.join("vip.toml");
    let text = "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"198.18.0.2\"\n\n[[vip]]\n\
                address = \"198.19.0.1\"\nprotocol = \"tcp\"\nport = 80\n[[vip.backend]]\n\
                address = \"198.18.1.1\"\n";
    fs::write(&config, text).unwrap();

    for pre in unit_values(&unit, "ExecStartPre") {
        let cmd = localize(&pre, &config);
        let out = Command::new(&cmd[0]).args(&cmd[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "ExecStartPre {pre}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // ExecStart as written (default pin dir and all), on a host of its own: a network
    // namespace with a private bpffs at /sys/fs/bpf.
    let start = unit_values(&unit, "ExecStart").pop().expect("ExecStart");
    let cmd = localize(&start, &config).join(" ");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg(format!("mount -t bpf bpf /sys/fs/bpf && exec {cmd}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let get = |path: &str| ns.http_get(path);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !get("/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(
            Instant::now() < deadline,
            "the agent started by ExecStart never became ready"
        );
        assert!(matches!(child.try_wait(), Ok(None)), "the agent exited");
        thread::sleep(Duration::from_millis(100));
    }
    // ExecReload: `kill -HUP $MAINPID`.
    let reload = unit_values(&unit, "ExecReload").pop().expect("ExecReload");
    assert_eq!(reload, "/bin/kill -HUP $MAINPID");
    let out = Command::new("/bin/kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(out.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get("/metrics")
        .is_some_and(|m| m.contains("vip_config_reloads_total{result=\"success\"} 1"))
    {
        assert!(
            Instant::now() < deadline,
            "no successful reload after ExecReload"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // systemctl stop: SIGTERM (KillSignal default).
    Command::new("/bin/kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

/// The image builds from sources only, with a nightly pinned by date, installs nothing the
/// build does not need, and ships a stripped agent with the tools the troubleshooting guide
/// uses.
#[test]
fn the_image_build_is_pinned_and_lean() {
    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let ignore = fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l == "target/") && ignore.lines().any(|l| l == ".git/"));
    let nightly = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG NIGHTLY=nightly-"))
        .expect("a nightly pinned by date");
    assert!(
        nightly.len() == 10 && nightly.split('-').count() == 3,
        "{nightly}"
    );
    assert!(dockerfile.contains("ENV VIP_NIGHTLY=${NIGHTLY}"));
    assert!(dockerfile.contains("cargo xtask setup --build-only"));
    assert!(dockerfile.contains("strip target/release/vip-agent"));
    assert!(dockerfile.contains("install -y --no-install-recommends bpftool iproute2"));
    // The build-only set-up is one xtask knows.
    let xtask = repo().join("target/debug/xtask");
    let help = Command::new(&xtask)
        .args(["setup", "--help"])
        .output()
        .expect("xtask (built by `cargo xtask`)");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--build-only"),
        "{}",
        String::from_utf8_lossy(&help.stdout)
    );
}

#[test]
fn container_entrypoint_and_arguments_match_the_cli() {
    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let json_array = |key: &str| -> Vec<String> {
        let line = dockerfile
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key}"));
        let list = line[key.len()..]
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']');
        list.split(',')
            .map(|s| s.trim().trim_matches('"').to_owned())
            .collect()
    };
    let entrypoint = json_array("ENTRYPOINT");
    let cmd = json_array("CMD");
    assert_eq!(entrypoint, ["/usr/local/bin/vip-agent"]);
    assert!(
        dockerfile
            .contains("COPY --from=build /src/target/release/vip-agent /usr/local/bin/vip-agent")
    );
    // The arguments parse: the agent gets as far as reading the (absent) config file.
    let args: Vec<String> = cmd
        .iter()
        .map(|a| a.replace("/etc/vip/vip.toml", "/nonexistent/vip.toml"))
        .collect();
    let out = Command::new(agent_bin()).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("/nonexistent/vip.toml")
            && err.contains("cannot read"),
        "{err}"
    );
}

/// The `vip.toml: |` block of a manifest's ConfigMap.
fn embedded_config(manifest: &str) -> String {
    let lines = manifest
        .lines()
        .skip_while(|l| !l.trim_end().ends_with("vip.toml: |"))
        .skip(1);
    let first = lines.clone().next().expect("config block");
    let indent = first.len() - first.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn kubernetes_manifests_validate_and_match_the_agent() {
    let dir = repo().join("deploy/kubernetes");
    let validator = PathBuf::from(std::env::var("HOME").unwrap())
        .join(".cache/vip/venv/bin/kubernetes-validate");
    let files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let out = Command::new(&validator)
        .arg("--strict")
        .args(&files)
        .output()
        .expect("kubernetes-validate (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for name in ["lb-daemonset.yaml", "backend-daemonset.yaml"] {
        let manifest = fs::read_to_string(dir.join(name)).unwrap();
        assert!(
            manifest
                .contains(r#"args: ["run", "--config", "/etc/vip/vip.toml", "--watch-config"]"#),
            "{name}"
        );
        assert!(
            manifest.contains("mountPath: /etc/vip") && manifest.contains("path: /sys/fs/bpf"),
            "{name}"
        );
        assert!(
            manifest.contains("path: /healthz") && manifest.contains("path: /readyz"),
            "{name}"
        );
        assert!(manifest.contains("hostNetwork: true"), "{name}");
        assert!(
            manifest.contains("priorityClassName: system-node-critical")
                && manifest.contains("tolerations:"),
            "{name}"
        );
        // Only the init step is privileged (it mounts bpffs for the host and sets sysctls);
        // the agent runs with the capabilities `the_manifests_capabilities_are_enough` tests.
        assert_eq!(manifest.matches("privileged: true").count(), 1, "{name}");
        assert!(
            manifest.contains("mountPropagation: HostToContainer"),
            "{name}"
        );
        assert!(manifest.contains("mount -t bpf bpf /sys/fs/bpf"), "{name}");
    }
    // The preStop drain is a command the agent knows, and the grace period covers it.
    let lb = fs::read_to_string(dir.join("lb-daemonset.yaml")).unwrap();
    assert!(lb.contains("/usr/local/bin/vip-agent drain; sleep 15"));
    let drain = agent(&["drain", "--help"]);
    assert!(drain.status.success());
    assert!(lb.contains("terminationGracePeriodSeconds: 60") && lb.contains("drain_time = 10"));
}

/// The shipped alert rules are valid Prometheus rules.
#[test]
fn alert_rules_pass_promtool() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo().join("deploy/prometheus/vip-alerts.yml"))
        .output()
        .expect("promtool (Debian's prometheus package, installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A manifest's node: a namespace whose `eth0` has `address`, set up as the init step leaves a
/// host (forwarding on).
fn node(tag: &str, address: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["link", "set", "eth1", "up"]);
    ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.forwarding=1",
        "net.ipv6.conf.all.forwarding=1",
    ]);
    ns
}

/// `vip-agent ARGS` in `ns`'s network (the host's mounts), with `env`.
fn agent_in(ns: &Netns, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(agent_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// One ConfigMap for every node: rendered for three nodes with their own downward-API host IP
/// (and their own addresses for "auto"), each node's effective config has its own addresses.
#[test]
fn one_config_renders_per_node() {
    let dir = repo().join("deploy/kubernetes");
    for (manifest, role) in [
        ("lb-daemonset.yaml", "lb"),
        ("backend-daemonset.yaml", "backend"),
    ] {
        let text = fs::read_to_string(dir.join(manifest)).unwrap();
        assert!(text.contains("fieldPath: status.hostIP") || role == "backend");
        let config =
            std::env::temp_dir().join(format!("vip-render-{}-{role}.toml", std::process::id()));
        // The password line as an operator with the Secret would have it.
        fs::write(
            &config,
            embedded_config(&text).replace("# password = ", "password = "),
        )
        .unwrap();
        for i in 1..=3 {
            let ip = format!("192.0.2.1{i}");
            let ns = node(&format!("render{i}"), &ip);
            let secret = format!("md5-of-node-{i}");
            let out = agent_in(
                &ns,
                &[("NODE_IP", &ip), ("BGP_PASSWORD", &secret)],
                &[
                    "check-config",
                    "--print-effective",
                    config.to_str().unwrap(),
                ],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let effective: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(!text.contains(&secret), "a secret in the output: {text}");
            if role == "lb" {
                assert_eq!(effective["node"]["source_v4"], ip.as_str(), "{text}");
                assert_eq!(effective["bgp"]["router_id"], ip.as_str(), "{text}");
                assert_eq!(effective["bgp"]["peers"][0]["password"], true, "{text}");
                assert_eq!(effective["bgp"]["peers"][0]["bfd"], true, "{text}");
            } else {
                assert_eq!(
                    effective["backend"]["addresses"],
                    serde_json::json!([ip]),
                    "{text}"
                );
            }
            // Without the variable the node's config is refused, saying which one.
            let out = agent_in(&ns, &[], &["check-config", config.to_str().unwrap()]);
            if role == "lb" {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    !out.status.success() && err.contains("NODE_IP is not set"),
                    "{err}"
                );
            }
        }
        let _ = fs::remove_file(&config);
    }
}

/// A DaemonSet's pod as far as this machine can run one: the agent started with the manifest's
/// arguments and only the capabilities it grants (bounding set), on a node prepared as the init
/// step prepares one, its config mounted as a ConfigMap volume is (`..data` symlink swaps). It
/// loads, attaches and becomes ready, and a ConfigMap update is applied without a signal.
#[test]
fn a_daemonset_pod_runs_with_its_capabilities_and_follows_configmap_updates() {
    let dir = repo().join("deploy/kubernetes");
    for manifest in ["lb-daemonset.yaml", "backend-daemonset.yaml"] {
        let text = fs::read_to_string(dir.join(manifest)).unwrap();
        let list = |prefix: &str| -> Vec<String> {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .unwrap_or_else(|| panic!("{manifest}: {prefix}"))
                .trim_end_matches(']')
                .split(',')
                .map(|c| c.trim().trim_matches('"').to_owned())
                .collect()
        };
        let caps: Vec<String> = list("add: [")
            .iter()
            .map(|c| format!("+{}", c.to_lowercase()))
            .collect();
        let ns = node(&format!("pod-{}", &manifest[..2]), "192.0.2.11");
        // The volume as the kubelet lays it out: vip.toml -> ..data/vip.toml -> a version.
        let volume = std::env::temp_dir().join(&ns.name);
        let version = |n: u32, body: &str| {
            let d = volume.join(format!("..v{n}"));
            fs::create_dir_all(&d).unwrap();
            let private = format!(
                "[node]\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n",
                ns.pin_dir.display(),
                volume.join("vip.sock").display()
            );
            fs::write(d.join("vip.toml"), body.replacen("[node]\n", &private, 1)).unwrap();
            let tmp = volume.join("..data_tmp");
            std::os::unix::fs::symlink(format!("..v{n}"), &tmp).unwrap();
            fs::rename(&tmp, volume.join("..data")).unwrap();
        };
        let body = embedded_config(&text);
        version(1, &body);
        std::os::unix::fs::symlink("..data/vip.toml", volume.join("vip.toml")).unwrap();
        let args: Vec<String> = list("args: [")
            .iter()
            .map(|a| {
                a.replace(
                    "/etc/vip/vip.toml",
                    volume.join("vip.toml").to_str().unwrap(),
                )
            })
            .collect();
        assert!(
            args.contains(&"--watch-config".to_owned()),
            "{manifest}: {args:?}"
        );
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .args([
                "setpriv",
                &format!("--bounding-set=-all,{}", caps.join(",")),
            ])
            .arg(agent_bin())
            .args(&args)
            .arg("--cleanup")
            .env("NODE_IP", "192.0.2.11")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let ready = wait_http(&ns, "/readyz", |r| r.starts_with("HTTP/1.1 200"));
        // A ConfigMap update: one more VIP.
        let updated = if manifest.starts_with("lb") {
            body.clone()
                + "\n[[vip]]\naddress = \"198.51.100.2\"\nprotocol = \"udp\"\nport = 53\n\
                            [[vip.backend]]\naddress = \"192.0.2.21\"\n"
        } else {
            body.replace(
                "vips = [\"198.51.100.1\"]",
                "vips = [\"198.51.100.1\", \"198.51.100.2\"]",
            )
        };
        version(2, &updated);
        let reloaded = ready
            && wait_http(&ns, "/metrics", |m| {
                m.contains("vip_config_reloads_total{result=\"success\"} 1")
            });
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let out = child.wait_with_output().unwrap();
        let _ = fs::remove_dir_all(&volume);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(ready, "{manifest} with {caps:?}: {log}");
        assert!(reloaded, "{manifest}: the update was not applied: {log}");
        assert!(log.contains("the config file changed"), "{log}");
    }
}
