//! Peering labs: a router namespace (BIRD, GoBGP or FRR) with one link per LB node, and the
//! configs both sides start from.
//!
//! ```text
//!   ns rt (router, AS 65000) ── r1 ── up0 ── ns lb1 (vip-agent, AS 65001)
//!                            └─ r2 ── up0 ── ns lb2 (vip-agent, AS 65001)  (ECMP)
//! ```

use crate::{node::Netns, router::Bird};

pub const VIP4: &str = "198.19.0.1";
pub const VIP6: &str = "fd00:19::1";

/// Router namespace `rt` with one link per LB namespace; LB i is 198.18.i.2, router 198.18.i.1.
pub fn topology(lbs: usize) -> (Netns, Vec<Netns>) {
    let rt = Netns::new("rt");
    let mut out = Vec::new();
    for i in 1..=lbs {
        let lb = Netns::new(&format!("lb{i}"));
        let r = format!("r{i}");
        rt.ip(&[
            "link", "add", &r, "type", "veth", "peer", "name", "up0", "netns", &lb.name,
        ]);
        rt.ip(&["addr", "add", &format!("198.18.{i}.1/24"), "dev", &r]);
        rt.ip(&[
            "addr",
            "add",
            &format!("fd00:18:{i}::1/64"),
            "dev",
            &r,
            "nodad",
        ]);
        rt.ip(&["link", "set", &r, "up"]);
        lb.ip(&["addr", "add", &format!("198.18.{i}.2/24"), "dev", "up0"]);
        lb.ip(&[
            "addr",
            "add",
            &format!("fd00:18:{i}::2/64"),
            "dev",
            "up0",
            "nodad",
        ]);
        lb.ip(&["link", "set", "up0", "up"]);
        out.push(lb);
    }
    (rt, out)
}

/// An LB node's config: two VIPs, BGP to the router at 198.18.i.1.
pub fn lb_config(lb: &Netns, i: usize, extra_bgp: &str, vips: &[&str]) -> String {
    let mut c = format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.{i}.2\"\nsource_v6 = \"fd00:18:{i}::2\"\n\
         pin_dir = \"{}\"\ntable_size = 251\nconntrack_entries = 4096\n\n\
         [bgp]\nasn = 65001\nrouter_id = \"198.18.{i}.2\"\nhold_time = 3\n\
         next_hop_v6 = \"fd00:18:{i}::2\"\ncommunities = [\"65001:100\"]\n\
         large_communities = [\"65001:7:8\"]\n{extra_bgp}\n\
         [[bgp.peer]]\naddress = \"198.18.{i}.1\"\nasn = 65000\n",
        lb.pin_dir.display()
    );
    for vip in vips {
        let backend = if vip.contains(':') {
            "fd00:1::1"
        } else {
            "198.18.100.1"
        };
        c += &format!(
            "\n[[vip]]\naddress = \"{vip}\"\nprotocol = \"tcp\"\nport = 80\n\
             [[vip.backend]]\naddress = \"{backend}\"\n"
        );
    }
    c
}

pub fn bird_config(lbs: usize, password: Option<&str>) -> String {
    let mut c = String::from(
        "router id 198.18.1.1;\nprotocol device {}\n\
         protocol kernel k4 { ipv4 { export all; }; merge paths on; }\n\
         protocol kernel k6 { ipv6 { export all; }; merge paths on; }\n",
    );
    for i in 1..=lbs {
        let pw = password.map_or(String::new(), |p| format!("password \"{p}\";"));
        c += &format!(
            "protocol bgp lb{i} {{ local 198.18.{i}.1 as 65000; neighbor 198.18.{i}.2 as 65001; \
             hold time 3; connect retry time 1; error wait time 1, 2; {pw}\n\
             ipv4 {{ import all; export none; }}; ipv6 {{ import all; export none; }}; }}\n"
        );
    }
    c
}

pub fn established(bird: &Bird, proto: &str) -> bool {
    bird.cli(&format!("show protocols {proto}"))
        .contains("Established")
}

/// The code block of docs/operations.md that starts with `first_line`, up to its closing fence.
pub fn operations_guide_block(first_line: &str) -> String {
    let guide = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .expect("docs/operations.md");
    let start = guide
        .find(first_line)
        .unwrap_or_else(|| panic!("no block starting with {first_line:?}"));
    let end = guide[start..].find("```").expect("the block's end");
    guide[start..start + end].to_owned()
}
