//! Backend health checks and run-time drain, in the lab (two LB nodes, three backends), with
//! TCP checks every 0.5 s, timeout 0.3 s, rise 2, fall 2.

use std::{
    net::{IpAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use vip_tests::lab::{Lab, LabSpec, VIP4, echo_all, tcp_hello};

const TIMEOUT: Duration = Duration::from_secs(3);
/// interval × fall, plus one interval for where the checks fall in it, plus slack.
const DETECT: Duration = Duration::from_millis(500 * 2 + 500 + 2000);

fn lab(prefix: &str) -> Lab {
    lab_with(prefix, "check = \"tcp\"")
}

/// The lab with `check` (lines of `[vip.health]`) and the timing above.
fn lab_with(prefix: &str, check: &str) -> Lab {
    vip_tests::require_root();
    let mut spec = LabSpec::new(prefix);
    spec.health = Some(format!(
        "{check}\ninterval = 0.5\ntimeout = 0.3\nrise = 2\nfall = 2"
    ));
    Lab::up_built(spec).expect("lab up")
}

fn connections(lab: &Lab, n: usize) -> Vec<(TcpStream, String)> {
    lab.connections(n, TIMEOUT, TIMEOUT)
}

fn backends_seen(lab: &Lab, n: usize) -> Vec<String> {
    connections(lab, n).into_iter().map(|(_, b)| b).collect()
}

/// Waits until both LB nodes report `backend`'s line containing `what`.
fn wait_condition(lab: &Lab, backend: &str, what: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let all = (1..=2).all(|i| {
            lab.agent_cli(i, &["backends"])
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with(&format!("tcp/{VIP4}:80 {backend} ")) && l.contains(what))
        });
        if all {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{backend} not {what} within {within:?}: {}",
            lab.agent_cli(1, &["backends"]).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dead_service_is_taken_out_and_comes_back() {
    let mut lab = lab("vipe2e-health");
    let mut conns = connections(&lab, 60);
    assert!(conns.iter().any(|(_, b)| b == "be3"));

    lab.stop_service(3);
    let took = wait_condition(&lab, "198.18.13.2", "down", DETECT);
    eprintln!("be3 marked down {took:?} after its service stopped (interval 0.5 s × fall 2)");
    // New flows avoid it; established flows to the other backends did not move.
    assert!(backends_seen(&lab, 60).iter().all(|b| b != "be3"));
    for (i, (c, b)) in conns
        .iter_mut()
        .enumerate()
        .filter(|(_, (_, b))| b != "be3")
    {
        assert_eq!(
            echo_all(std::slice::from_mut(c), "while be3 is down"),
            1,
            "connection {i} to {b} moved"
        );
    }

    lab.start_service(3).unwrap();
    let took = wait_condition(&lab, "198.18.13.2", "active", DETECT);
    eprintln!("be3 back {took:?} after its service restarted (rise 2)");
    assert!(backends_seen(&lab, 90).iter().any(|b| b == "be3"));
}

#[test]
fn drain_keeps_established_connections_and_avoids_new_ones() {
    let lab = lab("vipe2e-drain");
    let mut conns = connections(&lab, 60);
    let on_be1 = conns.iter().filter(|(_, b)| b == "be1").count();
    assert!(on_be1 > 0);
    for i in 1..=2 {
        // The backend host by both its addresses: the IPv4 VIP's four services (TCP, UDP and
        // iperf3's TCP and UDP) and the IPv6 VIP's two.
        let out = lab
            .agent_cli(
                i,
                &[
                    "drain",
                    "--backend",
                    "198.18.11.2",
                    "--backend",
                    "fd00:18:11::2",
                ],
            )
            .unwrap();
        assert!(
            out.contains("drained 198.18.11.2 and fd00:18:11::2 on 6 VIPs")
                && out.contains("tcp/198.19.0.1:80")
                && out.contains("udp/[fd00:19::1]:53"),
            "{out}"
        );
    }
    wait_condition(&lab, "198.18.11.2", "drained", TIMEOUT);
    assert_eq!(
        echo_all(
            &mut conns
                .iter()
                .map(|(c, _)| c.try_clone().unwrap())
                .collect::<Vec<_>>(),
            "drained"
        ),
        60
    );
    assert!(
        backends_seen(&lab, 60).iter().all(|b| b != "be1"),
        "new flows went to a drained backend"
    );

    for i in 1..=2 {
        lab.agent_cli(
            i,
            &[
                "undrain",
                "--backend",
                "198.18.11.2",
                "--backend",
                "fd00:18:11::2",
            ],
        )
        .unwrap();
    }
    wait_condition(&lab, "198.18.11.2", "active", TIMEOUT);
    assert!(backends_seen(&lab, 60).iter().any(|b| b == "be1"));
    conns.clear();
}

#[test]
fn a_vip_without_backends_is_withdrawn_and_comes_back() {
    let mut lab = lab("vipe2e-alldown");
    for i in 1..=3 {
        lab.stop_service(i);
    }
    let start = Instant::now();
    while lab.router_next_hops(VIP4) > 0 {
        assert!(
            start.elapsed() < DETECT * 2,
            "still routed: {}",
            lab.router_route(VIP4)
        );
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "VIP withdrawn {:?} after its last backend died",
        start.elapsed()
    );
    lab.start_service(2).unwrap();
    let start = Instant::now();
    while lab.router_next_hops(VIP4) < 2 {
        assert!(
            start.elapsed() < DETECT * 2,
            "not announced again: {}",
            lab.router_route(VIP4)
        );
        thread::sleep(Duration::from_millis(50));
    }
    let (_, backend, _) = lab
        .in_client(|| tcp_hello(VIP4.parse::<IpAddr>().unwrap(), TIMEOUT))
        .expect("the VIP works again");
    assert_eq!(backend, "be2");
}

/// `via = "datapath"`: checks go to the VIP, encapsulated toward the backend like client
/// traffic. A backend whose host and service answer, but whose VIP is not on `lo`, fails them
/// (a check to its own address would pass), and comes back once the VIP is there again.
#[test]
fn a_backend_without_the_vip_on_lo_fails_the_data_path_check() {
    let lab = lab_with("vipe2e-hcpath", "check = \"tcp\"\nvia = \"datapath\"");
    // Every backend passes through the data path, IPv4 and IPv6, TCP and UDP (the lab runs
    // no iperf3 server on :5201 yet).
    let deadline = Instant::now() + DETECT;
    loop {
        let all_ok = (1..=2).all(|i| {
            let out = lab.agent_cli(i, &["backends"]).unwrap_or_default();
            let lines: Vec<&str> = out.lines().filter(|l| l.contains(" weight ")).collect();
            lines.len() == 18
                && lines
                    .iter()
                    .filter(|l| !l.contains(":5201 "))
                    .all(|l| l.contains("active: ok in") && l.contains("through the data path"))
        });
        if all_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every backend passed through the data path: {}",
            lab.agent_cli(1, &["backends"]).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(100));
    }

    let be3 = lab.spec.ns("be3");
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["-n", &be3])
            .args(args)
            .output()
            .expect("ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    ip(&["addr", "del", &format!("{VIP4}/32"), "dev", "lo"]);
    let took = wait_condition(&lab, "198.18.13.2", "down", DETECT);
    eprintln!("be3 without {VIP4} on lo marked down {took:?} later");
    // Its service still answers on its own address: a direct check would not have noticed.
    let own: std::net::SocketAddr = "198.18.13.2:80".parse().unwrap();
    lab.in_client(move || TcpStream::connect_timeout(&own, TIMEOUT))
        .expect("be3's own address still serves");
    assert!(backends_seen(&lab, 60).iter().all(|b| b != "be3"));

    ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
    wait_condition(&lab, "198.18.13.2", "active", DETECT);
    assert!(backends_seen(&lab, 90).iter().any(|b| b == "be3"));
}

/// An HTTPS service (`openssl s_server -www`, self-signed) on a backend's own address.
struct HttpsService(std::process::Child);

impl HttpsService {
    fn start(lab: &Lab, backend: usize, dir: &std::path::Path) -> Self {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.spec.ns(&format!("be{backend}"))])
            .args(["openssl", "s_server", "-quiet", "-www", "-accept", "8443"])
            .arg("-cert")
            .arg(dir.join("cert.pem"))
            .arg("-key")
            .arg(dir.join("key.pem"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server");
        Self(child)
    }
}

impl Drop for HttpsService {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `check = "https"`: a TLS handshake and a GET; the backend goes down when its HTTPS service
/// stops and comes back when it returns.
#[test]
fn https_checks_follow_the_service() {
    let dir = std::env::temp_dir().join(format!("vip-https-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=backend.vip.test"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl req");
    assert!(made.status.success(), "{made:?}");
    let lab = lab_with(
        "vipe2e-https",
        "check = \"https\"\nport = 8443\ntls_server_name = \"backend.vip.test\"",
    );
    let mut services: Vec<Option<HttpsService>> = (1..=3)
        .map(|i| Some(HttpsService::start(&lab, i, &dir)))
        .collect();
    for backend in ["198.18.11.2", "198.18.12.2", "198.18.13.2"] {
        wait_condition(&lab, backend, "active: ok in", DETECT * 2);
    }
    services[2] = None;
    wait_condition(&lab, "198.18.13.2", "down", DETECT);
    let backends = lab.agent_cli(1, &["backends"]).unwrap();
    assert!(backends.contains("HTTPS 198.18.13.2:8443"), "{backends}");
    services[2] = Some(HttpsService::start(&lab, 3, &dir));
    wait_condition(&lab, "198.18.13.2", "active: ok in", DETECT);
    drop(services);
    let _ = std::fs::remove_dir_all(&dir);
}
