//! The lab's namespaces and links, and changes to them (a dead LB node, a routed baseline).

use std::{fs, path::Path};

use super::{
    LINK_MTU, Lab,
    error::{Result, io},
    shell::{in_ns, ip, sysctl},
};

/// A veth between two namespaces, both ends up, addressed.
pub(super) fn link(
    a: &str,
    a_dev: &str,
    a_addrs: &[String],
    b: &str,
    b_dev: &str,
    b_addrs: &[String],
) -> Result<()> {
    ip(&[
        "link", "add", a_dev, "netns", a, "type", "veth", "peer", "name", b_dev, "netns", b,
    ])?;
    // Encapsulated packets are 20-48 bytes longer than the client's: the links inside the "data
    // centre" have room for them (the client's link stays at 1500).
    for (n, dev) in [(a, a_dev), (b, b_dev)] {
        ip(&["-n", n, "link", "set", dev, "mtu", &LINK_MTU.to_string()])?;
    }
    for (n, dev, addrs) in [(a, a_dev, a_addrs), (b, b_dev, b_addrs)] {
        for addr in addrs {
            ip(&["-n", n, "addr", "add", addr, "dev", dev, "nodad"])?;
        }
        ip(&["-n", n, "link", "set", dev, "up"])?;
    }
    Ok(())
}

pub(super) fn default_routes(n: &str, v4: &str, v6: &str) -> Result<()> {
    ip(&["-n", n, "route", "add", "default", "via", v4])?;
    ip(&["-n", n, "-6", "route", "add", "default", "via", v6])
}

/// LB node `i` (1-based): its address and the router's on their link.
pub(super) fn lb_addrs(i: usize) -> (String, String, String, String) {
    (
        format!("198.18.{}.2", 1 + i),
        format!("198.18.{}.1", 1 + i),
        format!("fd00:18:{}::2", 1 + i),
        format!("fd00:18:{}::1", 1 + i),
    )
}

/// Backend `i` (1-based): IPv4 and IPv6 addresses.
pub fn backend_addrs(i: usize) -> (String, String) {
    (
        format!("198.18.{}.2", 10 + i),
        format!("fd00:18:{}::2", 10 + i),
    )
}

impl Lab {
    pub(super) fn topology(&self, decap_object: &Path) -> Result<()> {
        let s = &self.spec;
        let mut names: Vec<String> = vec!["client".into(), "router".into()];
        names.extend((1..=s.lbs).map(|i| format!("lb{i}")));
        names.extend((1..=s.backends()).map(|i| format!("be{i}")));
        for n in &names {
            ip(&["netns", "add", &s.ns(n)])?;
            ip(&["-n", &s.ns(n), "link", "set", "lo", "up"])?;
        }
        let (client, router) = (s.ns("client"), s.ns("router"));
        link(
            &client,
            "eth0",
            &["198.18.0.10/24".into(), "fd00:18::10/64".into()],
            &router,
            "r-client",
            &["198.18.0.1/24".into(), "fd00:18::1/64".into()],
        )?;
        default_routes(&client, "198.18.0.1", "fd00:18::1")?;
        // Keep each flow on its path: TCP would re-hash (and so change LB node) after every
        // retransmission timeout otherwise, which hides what failover does.
        sysctl(&client, "net.core.txrehash", "0")?;
        // The client's network has an ordinary MTU.
        ip(&["-n", &client, "link", "set", "eth0", "mtu", "1500"])?;
        ip(&["-n", &router, "link", "set", "r-client", "mtu", "1500"])?;
        // Full checksums from the client (veth offload would leave them to "hardware").
        in_ns(&client, &["ethtool", "-K", "eth0", "tx", "off"])?;
        for i in 1..=s.lbs {
            let lb = s.ns(&format!("lb{i}"));
            let (a4, r4, a6, r6) = lb_addrs(i);
            let r_dev = format!("r-lb{i}");
            link(
                &lb,
                "eth0",
                &[format!("{a4}/24"), format!("{a6}/64")],
                &router,
                &r_dev,
                &[format!("{r4}/24"), format!("{r6}/64")],
            )?;
            default_routes(&lb, &r4, &r6)?;
            // XDP_TX out of a veth reaches the peer only if the peer runs an XDP program:
            // vip's decap program with empty maps passes everything.
            let obj = decap_object.to_string_lossy().into_owned();
            ip(&[
                "-n", &router, "link", "set", "dev", &r_dev, "xdpdrv", "obj", &obj, "sec", "xdp",
            ])?;
        }
        for i in 1..=s.backends() {
            let be = s.ns(&format!("be{i}"));
            let (b4, b6) = backend_addrs(i);
            link(
                &be,
                "eth0",
                &[format!("{b4}/24"), format!("{b6}/64")],
                &router,
                &format!("r-be{i}"),
                &[
                    format!("198.18.{}.1/24", 10 + i),
                    format!("fd00:18:{}::1/64", 10 + i),
                ],
            )?;
            default_routes(
                &be,
                &format!("198.18.{}.1", 10 + i),
                &format!("fd00:18:{}::1", 10 + i),
            )?;
            // DSR: the client's packet arrives on eth0 while the VIP sits on lo.
            sysctl(&be, "net.ipv4.conf.all.rp_filter", "0")?;
            sysctl(&be, "net.ipv4.conf.eth0.rp_filter", "0")?;
            sysctl(&be, "net.ipv4.conf.all.arp_ignore", "1")?;
            sysctl(&be, "net.ipv4.conf.all.arp_announce", "2")?;
        }
        sysctl(&router, "net.ipv4.ip_forward", "1")?;
        sysctl(&router, "net.ipv6.conf.all.forwarding", "1")?;
        // ECMP on L4 hashes, both families.
        sysctl(&router, "net.ipv4.fib_multipath_hash_policy", "1")?;
        sysctl(&router, "net.ipv6.fib_multipath_hash_policy", "1")?;
        // Replies from backends carry the VIP as source; the VIP is routed toward the LBs.
        sysctl(&router, "net.ipv4.conf.all.rp_filter", "0")?;
        // `kill_lb` makes a node vanish with `ip rule ... blackhole` on the router. For that rule
        // to catch packets to the router itself (BIRD's sessions), it must come before the
        // `local` table, and established sockets must not skip the FIB (early demux).
        for family in ["-4", "-6"] {
            ip(&[
                "-n", &router, family, "rule", "add", "pref", "100", "lookup", "local",
            ])?;
            ip(&["-n", &router, family, "rule", "del", "pref", "0"])?;
        }
        sysctl(&router, "net.ipv4.ip_early_demux", "0")?;
        sysctl(&router, "net.ipv4.tcp_early_demux", "0")?;
        Ok(())
    }

    /// Makes the router send the client's packets for `dst` through LB node `lb`, which routes
    /// them back (the LB node "only routing": a baseline for the LB path, same hops, same links).
    pub fn route_through_lb(&self, dst: &str, lb: usize) -> Result<()> {
        let (router, node) = (self.spec.ns("router"), self.spec.ns(&format!("lb{lb}")));
        let (lb4, ..) = lb_addrs(lb);
        sysctl(&node, "net.ipv4.ip_forward", "1")?;
        // It forwards out of the interface the packet came in on: no redirects, no rp check.
        sysctl(&node, "net.ipv4.conf.all.send_redirects", "0")?;
        sysctl(&node, "net.ipv4.conf.eth0.send_redirects", "0")?;
        sysctl(&router, "net.ipv4.conf.all.rp_filter", "0")?;
        sysctl(&router, &format!("net.ipv4.conf.r-lb{lb}.rp_filter"), "0")?;
        let table = "100";
        ip(&[
            "-n", &router, "route", "add", dst, "via", &lb4, "table", table,
        ])?;
        ip(&[
            "-n", &router, "rule", "add", "pref", "50", "iif", "r-client", "to", dst, "lookup",
            table,
        ])
    }

    /// Makes LB node `i` die abruptly: the router no longer hears from it (its BGP session
    /// times out, the packets it would forward are lost), and its agent is killed.
    pub fn kill_lb(&mut self, i: usize) -> Result<()> {
        self.blackhole_lb(i, "add")?;
        let name = format!("lb{i}");
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| *n == name) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // And its datapath: unpinning the link detaches the program.
        fs::remove_dir_all(self.spec.pin_dir(&name)).map_err(io(format!("detaching lb{i}")))?;
        Ok(())
    }

    /// Brings LB node `i` back after [`Lab::kill_lb`], with nothing of its state: a fresh
    /// agent and datapath (empty conntrack), and the router hearing from it again.
    pub fn revive_lb(&mut self, i: usize) -> Result<()> {
        self.blackhole_lb(i, "del")?;
        let name = format!("lb{i}");
        self.children.retain(|(n, _)| *n != name);
        self.start_agent(&name, &self.lb_config(i))
    }

    /// Adds (`"add"`) or removes (`"del"`) the router's rule that drops everything LB node
    /// `i` sends.
    fn blackhole_lb(&self, i: usize, action: &str) -> Result<()> {
        let router = self.spec.ns("router");
        let dev = format!("r-lb{i}");
        for family in ["-4", "-6"] {
            ip(&[
                "-n",
                &router,
                family,
                "rule",
                action,
                "pref",
                "10",
                "iif",
                &dev,
                "blackhole",
            ])?;
        }
        Ok(())
    }
}
