//! What the lab shows: the router's routes, the agents' status, traffic through it (iperf3),
//! connections from the client.

use std::{fs, net::TcpStream, path::Path, process::Command, thread, time::Duration};

use super::{
    IPERF_PORT, Lab, SYNC_PORT, VIP4,
    error::{LabError, Result},
    services::tcp_hello,
    shell::{in_namespace, in_ns, ip_out},
    topology::{backend_addrs, lb_addrs},
};

/// The number `field` in the object `section` near the end of iperf3's JSON report.
pub(super) fn json_number(json: &str, section: &str, field: &str) -> Result<f64> {
    let at = json
        .rfind(&format!("\"{section}\""))
        .ok_or_else(|| LabError::Report(section.to_owned()))?;
    json[at..]
        .split(&format!("\"{field}\":"))
        .nth(1)
        .and_then(|v| v.split([',', '}', '\n']).next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| LabError::Report(format!("{section}.{field}")))
}

impl Lab {
    /// The router's kernel route to `vip`.
    pub fn router_route(&self, vip: &str) -> String {
        let family = if vip.contains(':') { "-6" } else { "-4" };
        ip_out(&["-n", &self.spec.ns("router"), family, "route", "show", vip])
    }

    /// Next hops of the router's route to `vip`.
    pub fn router_next_hops(&self, vip: &str) -> usize {
        let route = self.router_route(vip);
        match route.matches("nexthop via").count() {
            0 if route.contains(" via ") => 1,
            n => n,
        }
    }

    /// `vip-agent ARGS --pin-dir PINS` for LB node `i` (`status`, `which`), with its agent's
    /// control socket. Runs outside the namespace: `ip netns exec` would hide the pins behind
    /// a new /sys.
    pub fn lb_cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let name = format!("lb{i}");
        let output = Command::new(&self.agent)
            .arg("--socket")
            .arg(self.spec.control_socket(&name))
            .args(args)
            .arg("--pin-dir")
            .arg(self.spec.pin_dir(&name))
            .output()
            .map_err(super::error::io(format!("vip-agent {args:?} of {name}")))?;
        if !output.status.success() {
            return Err(LabError::NotReached(format!(
                "vip-agent {args:?} of {name}: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `vip-agent status` of a node.
    pub fn status(&self, name: &str) -> String {
        Command::new(&self.agent)
            .args(["status", "--pin-dir"])
            .arg(self.spec.pin_dir(name))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// What node `name`'s agent has logged since it last started.
    pub fn agent_log(&self, name: &str) -> String {
        fs::read_to_string(self.spec.run_dir().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Established flow-state sharing connections that LB node `from` has open to LB node
    /// `to`, as `to`'s kernel sees them.
    pub fn sync_connections(&self, from: usize, to: usize) -> Result<usize> {
        let port = format!("sport = :{SYNC_PORT}");
        let out = in_ns(
            &self.spec.ns(&format!("lb{to}")),
            &["ss", "-Htn", "state", "established", &port],
        )?;
        let from = format!("{}:", lb_addrs(from).0);
        Ok(out.lines().filter(|l| l.contains(&from)).count())
    }

    /// Packets LB node `i`'s datapath sent to backends (encapsulated).
    pub fn lb_forwarded(&self, i: usize) -> u64 {
        let status = self.status(&format!("lb{i}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("datapath: "))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|tx| tx.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// iperf3 from the client to `target` with `args`, its JSON report. Starts iperf3 servers
    /// on every backend first (once): one bound to the VIP, one to the backend's own address,
    /// so that UDP replies leave from the address the client sent to (DSR).
    fn iperf3(&mut self, target: &str, args: &[&str]) -> Result<String> {
        if !self.children.iter().any(|(n, _)| n.starts_with("iperf")) {
            for i in 1..=self.spec.backends() {
                let ns = self.spec.ns(&format!("be{i}"));
                let (own, _) = backend_addrs(i);
                for (tag, address) in [("vip", VIP4), ("own", own.as_str())] {
                    self.spawn(
                        &format!("iperf{i}{tag}"),
                        Path::new("ip"),
                        &[
                            "netns",
                            "exec",
                            &ns,
                            "iperf3",
                            "-s",
                            "-B",
                            address,
                            "-p",
                            &IPERF_PORT.to_string(),
                        ],
                    )?;
                }
            }
            thread::sleep(Duration::from_millis(500));
        }
        let port = IPERF_PORT.to_string();
        let mut cmd = vec!["iperf3", "-c", target, "-p", &port, "-J"];
        cmd.extend_from_slice(args);
        in_ns(&self.spec.ns("client"), &cmd)
    }

    /// TCP throughput (Gbit/s) from the client to `target` over `streams` connections.
    pub fn iperf(&mut self, target: &str, streams: u32, secs: u32) -> Result<f64> {
        let (streams, secs) = (streams.to_string(), secs.to_string());
        let out = self.iperf3(target, &["-P", &streams, "-t", &secs])?;
        Ok(json_number(&out, "sum_received", "bits_per_second")? / 1e9)
    }

    /// UDP packets per second (millions) that reach `target` from the client sending
    /// `len`-byte datagrams as fast as it can.
    pub fn iperf_udp(&mut self, target: &str, len: u32, secs: u32) -> Result<f64> {
        let (len, secs) = (len.to_string(), secs.to_string());
        let out = self.iperf3(target, &["-u", "-b", "0", "-l", &len, "-t", &secs])?;
        let packets = json_number(&out, "sum_received", "packets")?;
        let lost = json_number(&out, "sum_received", "lost_packets")?;
        let seconds = json_number(&out, "sum_received", "seconds")?;
        Ok((packets - lost) / seconds / 1e6)
    }

    /// Opens `n` TCP connections from the client to the IPv4 VIP (each given `timeout` to
    /// answer) and returns them, reads limited to `read_timeout`, with the backend each reached.
    pub fn connections(
        &self,
        n: usize,
        timeout: Duration,
        read_timeout: Duration,
    ) -> Vec<(TcpStream, String)> {
        self.in_client(move || {
            (0..n)
                .map(|_| {
                    let (s, backend, _) =
                        tcp_hello(VIP4.parse().unwrap(), timeout).expect("connect to the VIP");
                    s.set_read_timeout(Some(read_timeout)).unwrap();
                    (s, backend)
                })
                .collect()
        })
    }

    /// Runs `f` on a thread inside the client's namespace; sockets it makes stay there.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_namespace(&self.spec.ns("client"), f)
    }
}
