//! The processes of the lab and their configs: BIRD on the router, vip-agent on LB nodes and
//! backends, the backends' services.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{
    EGRESS_PORTS, EGRESS_REST_SECS, GUE_PORT, IPERF_PORT, LB_ASN, Lab, ROUTER_ASN, SYNC_PORT,
    TCP_PORT, UDP_PORT, VIP4, VIP6,
    error::{LabError, Result, io},
    shell::in_ns,
    topology::{backend_addrs, lb_addrs},
};

impl Lab {
    pub(super) fn start_bird(&mut self) -> Result<()> {
        let s = &self.spec;
        let dir = s.run_dir();
        let mut conf = format!(
            "log \"{}\" all;\nrouter id 198.18.0.1;\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ export all; }}; merge paths on; persist; }}\n\
             protocol kernel {{ ipv6 {{ export all; }}; merge paths on; persist; }}\n",
            dir.join("bird.log").display()
        );
        let bfd = match s.bfd {
            Some(ms) => {
                conf += &format!(
                    "protocol bfd {{ interface \"r-lb*\" {{ min rx interval {ms} ms; \
                     min tx interval {ms} ms; multiplier 3; }}; }}\n"
                );
                "bfd on;"
            }
            None => "",
        };
        for i in 1..=s.lbs {
            let (a4, r4, _, _) = lb_addrs(i);
            conf += &format!(
                "protocol bgp lb{i} {{ local {r4} as {ROUTER_ASN}; neighbor {a4} as {LB_ASN}; \
                 hold time 3; connect retry time 1; error wait time 1, 2; {bfd} \
                 ipv4 {{ import all; export none; }}; ipv6 {{ import all; export none; }}; }}\n"
            );
        }
        let conf_path = dir.join("bird.conf");
        fs::write(&conf_path, conf).map_err(io(format!("writing {}", conf_path.display())))?;
        let socket = dir.join("bird.ctl");
        let bird = crate::router::spawn_bird(&s.ns("router"), &conf_path, &socket)
            .map_err(io("starting bird"))?;
        self.children.push(("bird".into(), bird));
        Ok(())
    }

    /// Starts backend `i`'s services.
    pub fn start_service(&mut self, i: usize) -> Result<()> {
        let name = format!("be{i}");
        let ns = self.spec.ns(&name);
        let (b4, _) = backend_addrs(i);
        let program = self.services.clone();
        self.spawn(
            &format!("svc{i}"),
            &program,
            &["serve", "--netns", &ns, "--name", &name, "--address", &b4],
        )
    }

    /// Stops backend `i`'s services (the host stays up).
    pub fn stop_service(&mut self, i: usize) {
        let name = format!("svc{i}");
        for (_, child) in self.children.iter_mut().filter(|(n, _)| *n == name) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.retain(|(n, _)| *n != name);
    }

    /// `vip-agent ARGS` inside LB node `i`'s namespace, talking to its agent's control socket.
    pub fn agent_cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let agent = self.agent.to_string_lossy().into_owned();
        let socket = self.spec.control_socket(&format!("lb{i}"));
        let socket = socket.to_string_lossy();
        let mut cmd = vec![agent.as_str(), "--socket", &socket];
        cmd.extend_from_slice(args);
        in_ns(&self.spec.ns(&format!("lb{i}")), &cmd)
    }

    pub(super) fn spawn(&mut self, name: &str, program: &Path, args: &[&str]) -> Result<()> {
        let log = fs::File::create(self.spec.run_dir().join(format!("{name}.log")))
            .map_err(io(format!("creating the log of {name}")))?;
        let child = Command::new(program)
            .args(args)
            .stdout(log.try_clone().map_err(io(format!("the log of {name}")))?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    pub(super) fn start_agent(&mut self, name: &str, config: &str) -> Result<()> {
        let path = self.spec.run_dir().join(format!("{name}.toml"));
        fs::write(&path, config).map_err(io(format!("writing {}", path.display())))?;
        let ns = self.spec.ns(name);
        let agent = self.agent.clone();
        let path = path.to_string_lossy().into_owned();
        self.spawn(
            name,
            &agent,
            &["run", "--cleanup", "--netns", &ns, "--config", &path],
        )?;
        let link = self.spec.pin_dir(name).join("links/xdp_eth0");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !link.exists() {
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.spec.run_dir().join(format!("{name}.log")))
                    .unwrap_or_default();
                return Err(LabError::NotReached(format!(
                    "agent {name} did not attach: {log}"
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    pub(super) fn lb_config(&self, i: usize) -> String {
        let (a4, r4, a6, _) = lb_addrs(i);
        let mut c = format!(
            "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"{a4}\"\nsource_v6 = \"{a6}\"\npin_dir = \"{}\"\n\
             control_socket = \"{}\"\n\n\
             [bgp]\nasn = {LB_ASN}\nrouter_id = \"{a4}\"\nhold_time = 3\nnext_hop_v6 = \"{a6}\"\n{bfd}\
             [[bgp.peer]]\naddress = \"{r4}\"\nasn = {ROUTER_ASN}\n",
            self.spec.pin_dir(&format!("lb{i}")).display(),
            self.spec.control_socket(&format!("lb{i}")).display(),
            bfd = self.spec.bfd.map_or(String::new(), |ms| format!(
                "bfd = true\nbfd_min_tx = {ms}\nbfd_min_rx = {ms}\nbfd_multiplier = 3\n"
            )),
        );
        for (vip, proto, port) in [
            (VIP4, "tcp", TCP_PORT),
            (VIP4, "udp", UDP_PORT),
            (VIP6, "tcp", TCP_PORT),
            (VIP6, "udp", UDP_PORT),
            (VIP4, "tcp", IPERF_PORT),
            (VIP4, "udp", IPERF_PORT),
        ] {
            c +=
                &format!("\n[[vip]]\naddress = \"{vip}\"\nprotocol = \"{proto}\"\nport = {port}\n");
            if port == IPERF_PORT {
                // iperf3's control and data connections must reach the same server.
                c += "hash = \"addresses\"\n";
            }
            if self.spec.gue {
                c += &format!("encapsulation = \"gue\"\ngue_port = {GUE_PORT}\n");
            }
            if let Some(health) = &self.spec.health {
                // UDP VIPs are checked with a datagram the lab's service echoes.
                let health = if proto == "udp" {
                    health.replace(
                        "check = \"tcp\"",
                        "check = \"udp\"
udp_expect = \"ping\"",
                    )
                } else {
                    health.clone()
                };
                c += &format!(
                    "[vip.health]
{health}
"
                );
            }
            for (b, addr, weight) in self.configured_backends(vip) {
                c += &format!("[[vip.backend]]\naddress = \"{addr}\"\nweight = {weight}\n");
                if self.spec.drained.contains(&(b + 1)) {
                    c += "state = \"draining\"\n";
                }
            }
        }
        c + &self.egress_config() + &self.sync_config(i)
    }

    /// LB node `i`'s `[sync]` (none without `spec.sync`).
    fn sync_config(&self, i: usize) -> String {
        if !self.spec.sync || self.spec.sync_without == Some(i) {
            return String::new();
        }
        let peers: Vec<String> = (1..=self.spec.lbs)
            .filter(|&j| j != i)
            .map(|j| format!("\"{}:{SYNC_PORT}\"", lb_addrs(j).0))
            .collect();
        let key = if self.spec.sync_wrong_key == Some(i) {
            "sync-other.key"
        } else {
            "sync.key"
        };
        let fetch_timeout = self
            .spec
            .sync_fetch_timeout
            .map_or(String::new(), |secs| format!("fetch_timeout = {secs}\n"));
        format!(
            "\n[sync]\nlisten = \"{}:{SYNC_PORT}\"\npeers = [{}]\nkey_file = \"{}\"\n\
             refresh = 5\n{fetch_timeout}",
            lb_addrs(i).0,
            peers.join(", "),
            self.spec.run_dir().join(key).display()
        )
    }

    /// The backends the LB nodes have (weight above 0): index from 0, address of `vip`'s
    /// family, weight.
    fn configured_backends(&self, vip: &str) -> Vec<(usize, String, u32)> {
        self.spec
            .weights
            .iter()
            .enumerate()
            .filter(|(_, w)| **w > 0)
            .map(|(b, weight)| {
                let (b4, b6) = backend_addrs(b + 1);
                (b, if vip == VIP6 { b6 } else { b4 }, *weight)
            })
            .collect()
    }

    /// The `[[egress]]` sections every node has (none without `egress_block_size`).
    fn egress_config(&self) -> String {
        let Some(size) = self.spec.egress_block_size else {
            return String::new();
        };
        let (first, last) = EGRESS_PORTS;
        let mut c = String::new();
        for vip in [VIP4, VIP6] {
            c += &format!(
                "\n[[egress]]\nvip = \"{vip}\"\nports = \"{first}-{last}\"\nblock_size = {size}\n\
                 rest = {EGRESS_REST_SECS}\n"
            );
            for (block, addr, _) in self.configured_backends(vip) {
                c += &format!("[[egress.backend]]\naddress = \"{addr}\"\nblock = {block}\n");
            }
        }
        c
    }

    pub(super) fn backend_config(&self, i: usize) -> String {
        let (b4, b6) = backend_addrs(i);
        format!(
            "[node]\nrole = \"backend\"\ninterfaces = [\"eth0\"]\npin_dir = \"{}\"\n\
             control_socket = \"{}\"\n\n\
             [backend]\naddresses = [\"{b4}\", \"{b6}\"]\nvips = [\"{VIP4}\", \"{VIP6}\"]\n\
             gue_port = {GUE_PORT}\n{}",
            self.spec.pin_dir(&format!("be{i}")).display(),
            self.spec.control_socket(&format!("be{i}")).display(),
            self.egress_config(),
        )
    }

    /// Sends SIGTERM to LB node `i`'s agent, as an operator stopping it would: it withdraws
    /// its routes and closes its sessions (Cease); its datapath stays attached.
    pub fn stop_lb(&mut self, i: usize) {
        let name = format!("lb{i}");
        if let Some((_, child)) = self.children.iter().find(|(n, _)| *n == name) {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }

    /// Changes the backends' weights on the LB nodes `lbs` (config rewrite and SIGHUP), and
    /// waits until each has applied it. Weight 0 removes a backend.
    pub fn set_weights(&mut self, weights: &[u32], lbs: &[usize]) -> Result<()> {
        self.spec.weights = weights.to_vec();
        for &i in lbs {
            self.reload(&format!("lb{i}"), &self.lb_config(i))?;
        }
        Ok(())
    }

    /// Makes the backends `drained` (1-based) draining in the config of the LB nodes `lbs`
    /// (rewrite and SIGHUP), and waits until each has applied it.
    pub fn set_drained(&mut self, drained: &[usize], lbs: &[usize]) -> Result<()> {
        self.spec.drained = drained.to_vec();
        for &i in lbs {
            self.reload(&format!("lb{i}"), &self.lb_config(i))?;
        }
        Ok(())
    }

    /// Gives backend `i` the config that the current weights make (its egress block comes and
    /// goes with its weight), and waits until it has applied it.
    pub fn reconfigure_backend(&mut self, i: usize) -> Result<()> {
        self.reload(&format!("be{i}"), &self.backend_config(i))
    }

    /// Rewrites node `name`'s config, sends SIGHUP, and waits until it reloaded.
    fn reload(&self, name: &str, config: &str) -> Result<()> {
        let log_path = self.spec.run_dir().join(format!("{name}.log"));
        let reloads = || {
            fs::read_to_string(&log_path)
                .unwrap_or_default()
                .matches("reloaded")
                .count()
        };
        let before = reloads();
        let path = self.spec.run_dir().join(format!("{name}.toml"));
        fs::write(&path, config).map_err(io(format!("writing {}", path.display())))?;
        let child = self
            .children
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| LabError::NoSuchNode(name.to_owned()))?;
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.1.id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloads() == before {
            if Instant::now() > deadline {
                return Err(LabError::NotReached(format!("{name} did not reload")));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}
