//! `vip-agent check-config` rejects bad configs whole, naming file, line and field, and accepts
//! good ones, without touching the system.

use vip_tests::node::agent;

const GOOD: &str = r#"[node]
interfaces = ["eth0"]
source_v4 = "198.18.0.2"
source_v6 = "fd00:18::2"
table_size = 251

[[vip]]
address = "198.19.0.1"
protocol = "tcp"
port = 80
source_prefix = "198.19.128.0/24"

[[vip.backend]]
address = "198.18.1.1"
weight = 2

[[vip.backend]]
address = "198.18.1.2"
state = "draining"

[[vip]]
address = "fd00:19::1"
protocol = "udp"
hash = "addresses"
udp_idle_timeout = 60

[[vip.backend]]
address = "fd00:1::1"
"#;

fn check(text: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("vip-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("c{}.toml", text.len()));
    std::fs::write(&path, text).unwrap();
    let out = agent(&["check-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    // The last of the parallel checks removes the directory.
    let _ = std::fs::remove_dir(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn good_config_passes() {
    let (ok, out) = check(GOOD);
    assert!(ok, "{out}");
    assert!(out.contains("ok (2 VIPs, 3 backends)"), "{out}");
}

#[test]
fn bad_configs_are_rejected_with_the_field_named() {
    // (what is wrong, the edit, text the error must contain)
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty file", String::new(), "node"),
        ("not TOML", "[node\n".into(), "c"),
        (
            "unknown top-level table",
            format!("{GOOD}\n[bgpp]\n"),
            "bgpp",
        ),
        (
            "unknown node field",
            GOOD.replace("table_size", "tablesize"),
            "tablesize",
        ),
        (
            "no interfaces",
            GOOD.replace("[\"eth0\"]", "[]"),
            "node.interfaces",
        ),
        (
            "interfaces not a list",
            GOOD.replace("[\"eth0\"]", "\"eth0\""),
            "interfaces",
        ),
        (
            "bad attach mode",
            GOOD.replace("[node]", "[node]\nattach = \"turbo\""),
            "native",
        ),
        (
            "bad source address",
            GOOD.replace("\"198.18.0.2\"", "\"198.18.0.256\""),
            "source_v4",
        ),
        (
            "table size not prime",
            GOOD.replace("251", "250"),
            "node.table_size",
        ),
        (
            "table size too small",
            GOOD.replace("251", "5"),
            "node.table_size",
        ),
        (
            "too few table slots",
            GOOD.replace("[node]", "[node]\ntable_slots = 2"),
            "node.table_slots",
        ),
        (
            "bad VIP address",
            GOOD.replace("\"198.19.0.1\"", "\"198.19.0\""),
            "address",
        ),
        (
            "unspecified VIP",
            GOOD.replace("\"198.19.0.1\"", "\"0.0.0.0\""),
            "vip[0].address",
        ),
        (
            "bad protocol",
            GOOD.replace("\"tcp\"", "\"sctp\""),
            "protocol",
        ),
        (
            "port out of range",
            GOOD.replace("port = 80", "port = 70000"),
            "port",
        ),
        (
            "duplicate VIP",
            format!("{GOOD}\n[[vip]]\naddress = \"198.19.0.1\"\nprotocol = \"tcp\"\nport = 80\n"),
            "configured twice",
        ),
        (
            "unknown VIP field",
            GOOD.replace("port = 80", "port = 80\nmtu = 1500"),
            "mtu",
        ),
        (
            "bad hash",
            GOOD.replace("\"addresses\"", "\"ports\""),
            "five-tuple",
        ),
        (
            "zero UDP idle timeout",
            GOOD.replace("udp_idle_timeout = 60", "udp_idle_timeout = 0"),
            "udp_idle_timeout",
        ),
        (
            "source prefix of the wrong family",
            GOOD.replace("198.19.128.0/24", "fd00::/120"),
            "vip[0].source_prefix",
        ),
        (
            "bad backend address",
            GOOD.replace("\"198.18.1.1\"", "\"backend-1\""),
            "address",
        ),
        (
            "duplicate backend",
            GOOD.replace("\"198.18.1.2\"", "\"198.18.1.1\""),
            "vip[0].backend[1].address",
        ),
        (
            "weight too large",
            GOOD.replace("weight = 2", "weight = 1001"),
            "vip[0].backend[0].weight",
        ),
        (
            "negative weight",
            GOOD.replace("weight = 2", "weight = -1"),
            "weight",
        ),
        (
            "bad backend state",
            GOOD.replace("\"draining\"", "\"sleeping\""),
            "active",
        ),
        (
            "IPv6 backend without an IPv6 source",
            GOOD.replace("source_v6 = \"fd00:18::2\"\n", ""),
            "node.source_v6",
        ),
        (
            "backend role without [backend]",
            GOOD.replace("[node]", "[node]\nrole = \"backend\""),
            "backend",
        ),
        (
            "[backend] on an LB node",
            format!("{GOOD}\n[backend]\naddresses = [\"198.18.1.1\"]\n"),
            "node.role",
        ),
        (
            "bad role",
            GOOD.replace("[node]", "[node]\nrole = \"router\""),
            "lb",
        ),
        (
            "bad health check path",
            GOOD.replace(
                "weight = 2",
                "weight = 2\n[vip.backend.health]\ncheck = \"tcp\"\nvia = \"tunnel\"",
            ),
            "datapath",
        ),
        (
            "data-path check of a backend of another family",
            GOOD.replace(
                "address = \"198.18.1.2\"\nstate = \"draining\"",
                "address = \"fd00:1::2\"\n[vip.backend.health]\ncheck = \"tcp\"\nvia = \"datapath\"",
            ),
            "backend[1].health.via",
        ),
        (
            "a backend at 0.0.0.0",
            GOOD.replace("address = \"198.18.1.1\"", "address = \"0.0.0.0\""),
            "vip[0].backend[0].address",
        ),
        (
            "a UDP idle timeout that would wrap in nanoseconds",
            GOOD.replace("port = 80\n", "port = 80\nudp_idle_timeout = 18446744074\n"),
            "vip[0].udp_idle_timeout",
        ),
        (
            "Maglev tables beyond memory",
            GOOD.replace("table_size = 251", "table_size = 65537\ntable_slots = 65536"),
            "node.table_slots",
        ),
        (
            "no conntrack entries",
            GOOD.replace("[node]", "[node]\nconntrack_entries = 0"),
            "node.conntrack_entries",
        ),
        (
            "kernel routes in the main table",
            format!("{GOOD}\n[announce]\nmode = \"kernel\"\ntable = 254\n"),
            "announce.table",
        ),
        (
            "kernel routes and a BGP speaker at once",
            format!(
                "{GOOD}\n[announce]\nmode = \"kernel\"\n[bgp]\nasn = 65001\n\
                 router_id = \"198.18.0.2\"\nnext_hop_v6 = \"fd00:18::2\"\n\
                 [[bgp.peer]]\naddress = \"198.18.0.1\"\nasn = 65000\n"
            ),
            "announce.mode",
        ),
        (
            "an IPv6 VIP with only IPv4 peers and no IPv6 next hop",
            format!(
                "{GOOD}\n[bgp]\nasn = 65001\nrouter_id = \"198.18.0.2\"\n\
                 [[bgp.peer]]\naddress = \"198.18.0.1\"\nasn = 65000\n"
            ),
            "bgp.next_hop_v6",
        ),
        (
            "empty TCP MD5 password",
            format!(
                "{GOOD}\n[bgp]\nasn = 65001\nrouter_id = \"198.18.0.2\"\n\
                 [[bgp.peer]]\naddress = \"198.18.0.1\"\nasn = 65000\npassword = \"\"\n"
            ),
            "bgp.peer[0].password",
        ),
    ];
    assert!(cases.len() >= 20);
    for (what, text, needle) in cases {
        let (ok, out) = check(&text);
        assert!(!ok, "{what}: accepted");
        assert!(
            out.contains(needle),
            "{what}: error does not mention {needle:?}: {out}"
        );
        assert!(
            out.contains(".toml"),
            "{what}: error does not name the file: {out}"
        );
    }
}
