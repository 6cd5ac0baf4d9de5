//! Config parsing and validation, error messages included.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use super::*;

const GOOD: &str = r#"
[node]
interfaces = ["eth0"]
source_v4 = "198.18.0.2"
table_size = 251

[[vip]]
address = "198.19.0.1"
protocol = "tcp"
port = 80

[[vip.backend]]
address = "198.18.1.1"

[[vip.backend]]
address = "198.18.1.2"
weight = 2
state = "draining"
"#;

fn error(text: &str) -> ConfigError {
    parse(Path::new("vip.toml"), text).expect_err("config must be rejected")
}

#[test]
fn good_config_with_defaults() {
    let c = parse(Path::new("vip.toml"), GOOD).unwrap();
    assert_eq!(c.node.attach, AttachMode::Auto);
    assert_eq!(c.node.pin_dir, PathBuf::from("/sys/fs/bpf/vip"));
    assert_eq!(c.vips[0].hash, HashFields::FiveTuple);
    assert_eq!(c.vips[0].backends[0].weight, 1);
    assert_eq!(c.vips[0].backends[1].table_weight(), 0);
    assert_eq!(c.vips[0].to_string(), "tcp/198.19.0.1:80");
}

#[test]
fn errors_name_file_line_field_and_what_is_allowed() {
    let e = error(&GOOD.replace("weight = 2", "weight = 5000"));
    assert_eq!(e.line(), Some(17));
    assert_eq!(e.field, "vip[0].backend[1].weight");
    // Line and column, and the line itself with a caret under the value.
    assert!(
        e.to_string()
            .starts_with("vip.toml:17:10: vip[0].backend[1].weight: 5000"),
        "{e}"
    );
    assert!(
        e.to_string()
            .ends_with("\n 17 | weight = 5000\n    |          ^"),
        "{e}"
    );

    let e = error(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
    assert_eq!(e.line(), Some(9));
    assert_eq!(e.field, "vip[0].protocol");
    assert!(
        e.message.contains("tcp") && e.message.contains("udp"),
        "{e}"
    );

    let e = error(&GOOD.replace("state = \"draining\"", "state = \"gone\""));
    assert_eq!(e.field, "vip[0].backend[1].state");

    let e = error(&GOOD.replace("table_size = 251", "table_size = 250"));
    assert_eq!((e.line(), e.field.as_str()), (Some(5), "node.table_size"));

    let e = error(&GOOD.replace("address = \"198.18.1.2\"", "address = \"198.18.1.1\""));
    assert_eq!(
        (e.line(), e.field.as_str()),
        (Some(16), "vip[0].backend[1].address")
    );

    let e = error(&GOOD.replace("source_v4 = \"198.18.0.2\"\n", ""));
    assert!(e.message.contains("node.source_v4"), "{e}");

    let e = error(&GOOD.replace("port = 80", "port = 80\ncolour = \"blue\""));
    assert!(e.message.contains("unknown field `colour`"), "{e}");

    let e = error(&GOOD.replace("address = \"198.19.0.1\"", "address = \"198.19.0.300\""));
    assert_eq!(e.line(), Some(8));
}

#[test]
fn health_checks_merge_vip_and_backend_settings() {
    let text = GOOD.replace(
        "port = 80\n",
        "port = 80\n[vip.health]\ncheck = \"http\"\ninterval = 0.5\ntimeout = 0.2\nhttp_path = \"/ok\"\n",
    )
    .replace("state = \"draining\"\n", "state = \"draining\"\n[vip.backend.health]\nfall = 5\nport = 8080\n");
    let c = parse(Path::new("h.toml"), &text).unwrap();
    let (a, b) = (&c.vips[0].backends[0].health, &c.vips[0].backends[1].health);
    assert_eq!(
        (a.kind, a.port, a.fall, a.rise),
        (CheckKind::Http, 80, 3, 2)
    );
    assert_eq!(a.interval, Duration::from_millis(500));
    assert_eq!(
        (b.kind, b.port, b.fall, b.http_path.as_str()),
        (CheckKind::Http, 8080, 5, "/ok")
    );
    let e = error(&text.replace("timeout = 0.2", "timeout = 2"));
    assert!(e.message.contains("longer than interval"), "{e}");
}

#[test]
fn backend_role() {
    let text = r#"
[node]
role = "backend"
interfaces = ["eth0"]

[backend]
addresses = ["198.18.1.1", "fd00:1::1"]
vips = ["198.19.0.1", "198.19.0.1", "fd00:19::1"]
"#;
    let c = parse(Path::new("b.toml"), text).unwrap();
    assert_eq!(c.node.role, Role::Backend);
    assert_eq!(c.backend.as_ref().unwrap().addresses.len(), 2);
    assert_eq!(c.loopback_addresses().len(), 2);

    let e = error(&text.replace("role = \"backend\"\n", ""));
    assert!(e.message.contains("node.role"), "{e}");
    let e = error(&text.replace("[backend]", "[backend]\nport = 1"));
    assert!(e.message.contains("unknown field `port`"), "{e}");
    let e = error(&format!(
        "{text}\n[[vip]]\naddress = \"198.19.0.1\"\nprotocol = \"tcp\"\n"
    ));
    assert!(e.message.contains("backend.vips"), "{e}");
}

#[test]
fn missing_and_unknown_keys_are_named_in_their_table() {
    // A missing key is named where it is missing, inside its table.
    let e = error(&FULL.replace("asn = 65000\npassword", "password"));
    assert_eq!(e.field, "bgp.peer[0].asn", "{e}");
    let e = error(&FULL.replace("router_id = \"198.18.0.2\"\n", ""));
    assert_eq!(e.field, "bgp.router_id", "{e}");
    // A table header with a comment does not move the place of what follows.
    let e = error(
        &GOOD
            .replace("[[vip]]", "[[vip]] # the web VIP")
            .replace("port = 80", "port = 80\ncolour = 1"),
    );
    assert_eq!(e.field, "vip[0].colour", "{e}");
}

/// One run shows every mistake, the node's, every VIP's and every peer's, each at its place.
#[test]
fn every_mistake_is_reported_at_once() {
    let text = FULL
        .replace("table_size = 251", "table_size = 250")
        .replace("weight = 3", "weight = 3000")
        .replace("gue_port = 6080", "gue_port = 0")
        .replace("password = \"secret\"", "password = \"\"");
    let e = error(&text);
    let all: Vec<&ConfigError> = std::iter::once(&e).chain(&e.also).collect();
    let fields: Vec<&str> = all.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "node.table_size",
            "vip[0].backend[0].weight",
            "vip[1].gue_port",
            "bgp.peer[0].password"
        ],
        "{e}"
    );
    let shown = e.to_string();
    assert_eq!(shown.matches("vip.toml:").count(), 4, "{shown}");
}

#[test]
fn duplicate_vip_is_rejected() {
    let twice =
        format!("{GOOD}\n[[vip]]\naddress = \"198.19.0.1\"\nprotocol = \"tcp\"\nport = 80\n");
    let e = error(&twice);
    assert!(e.message.contains("configured twice"), "{e}");
    assert_eq!(e.line(), Some(21));
}

/// A config that uses every section.
const FULL: &str = r#"
[node]
interfaces = ["eth0", "eth1"]
source_v4 = "198.18.0.2"
source_v6 = "fd00:18::2"
pin_dir = "/sys/fs/bpf/vip"
table_size = 251
table_slots = 16
conntrack_entries = 8192
max_vips = 64
max_backends = 256

[bgp]
asn = 65001
router_id = "198.18.0.2"
hold_time = 9
drain_time = 5
next_hop_v6 = "fd00:18::2"
bfd = true
bfd_min_tx = 100
bfd_min_rx = 200
bfd_multiplier = 4

[[bgp.peer]]
address = "198.18.0.1"
asn = 65000
password = "secret"

[[bgp.peer]]
address = "198.18.0.3"
asn = 65000
bfd = false

[[vip]]
address = "198.19.0.1"
protocol = "tcp"
port = 80
udp_idle_timeout = 30
[vip.health]
check = "http"
http_status = 200
interval = 1
timeout = 0.5

[[vip.backend]]
address = "198.18.1.1"
weight = 3

[[vip.backend]]
address = "198.18.1.2"

[[vip]]
address = "fd00:19::1"
protocol = "udp"
port = 53
encapsulation = "gue"
gue_port = 6080

[[vip.backend]]
address = "fd00:1::1"
"#;

#[test]
fn bfd_per_peer_with_timers_that_a_reload_applies() {
    let c = parse(Path::new("vip.toml"), FULL).unwrap();
    let bgp = c.bgp.as_ref().unwrap();
    assert!(
        bgp.peers[0].bfd,
        "`bfd` under [bgp] is every peer's default"
    );
    assert!(!bgp.peers[1].bfd, "a peer's own `bfd` wins");
    assert_eq!(
        bgp.bfd_timers,
        crate::bfd::Timers {
            min_tx: Duration::from_millis(100),
            min_rx: Duration::from_millis(200),
            multiplier: 4,
        }
    );
    let defaults = parse(
        Path::new("vip.toml"),
        &FULL.replace("bfd_min_tx = 100\n", ""),
    )
    .unwrap();
    assert_eq!(
        defaults.bgp.unwrap().bfd_timers.min_tx,
        Duration::from_millis(300)
    );

    let e = error(&FULL.replace("bfd_min_tx = 100", "bfd_min_tx = 5"));
    assert_eq!(e.field, "bgp.bfd_min_tx");
    assert!(e.message.contains("10 to 60000"), "{e}");
    let e = error(&FULL.replace("bfd_multiplier = 4", "bfd_multiplier = 0"));
    assert_eq!(e.field, "bgp.bfd_multiplier");
    let e = error(&FULL.replace("bfd_multiplier = 4", "bfd_multiplier = 256"));
    assert!(e.to_string().contains("bfd_multiplier"), "{e}");

    // Timers, and BFD on or off, change by reload, like every BGP setting; only vip's own
    // speaker coming or going needs a restart.
    for (old, new) in [
        ("bfd_min_tx = 100", "bfd_min_tx = 400"),
        ("bfd = true", "bfd = false"),
        ("asn = 65001", "asn = 65002"),
    ] {
        let changed = parse(Path::new("vip.toml"), &FULL.replace(old, new)).unwrap();
        assert!(c.restart_needed(&changed).is_empty(), "{new}");
    }
    let without_bgp =
        FULL[..FULL.find("[bgp]").unwrap()].to_owned() + &FULL[FULL.find("[[vip]]").unwrap()..];
    let without_bgp = parse(Path::new("vip.toml"), &without_bgp).unwrap();
    assert_eq!(c.restart_needed(&without_bgp), ["bgp"]);
}

#[test]
fn auto_takes_each_nodes_addresses_from_its_first_interface() {
    let host = HostAddresses::new(vec![
        ("eth0".into(), "fe80::11".parse().unwrap()),
        ("eth0".into(), "192.0.2.11".parse().unwrap()),
        ("eth0".into(), "2001:db8::11".parse().unwrap()),
        ("eth1".into(), "198.51.100.11".parse().unwrap()),
    ]);
    let text = FULL
        .replace("source_v4 = \"198.18.0.2\"", "source_v4 = \"auto\"")
        .replace("source_v6 = \"fd00:18::2\"", "source_v6 = \"auto\"")
        .replace("router_id = \"198.18.0.2\"", "router_id = \"auto\"")
        .replace("next_hop_v6 = \"fd00:18::2\"", "next_hop_v6 = \"auto\"");
    let c = parse_on(Path::new("vip.toml"), &text, &host).unwrap();
    assert_eq!(c.node.source_v4, Some("192.0.2.11".parse().unwrap()));
    assert_eq!(c.node.source_v6, Some("2001:db8::11".parse().unwrap()));
    let bgp = c.bgp.unwrap();
    assert_eq!(
        bgp.router_id,
        "192.0.2.11".parse::<std::net::Ipv4Addr>().unwrap()
    );
    assert_eq!(bgp.next_hop_v6, Some("2001:db8::11".parse().unwrap()));
    // A host without the address: the field that asked for it, and why.
    let e = parse(Path::new("vip.toml"), &text).unwrap_err();
    assert_eq!(e.field, "node.source_v4");
    assert!(e.message.contains("eth0 has no IPv4 address"), "{e}");

    let backend = "[node]\nrole = \"backend\"\ninterfaces = [\"eth0\", \"eth1\"]\n\
                   [backend]\naddresses = \"auto\"\nvips = [\"198.19.0.1\"]\n";
    let c = parse_on(Path::new("vip.toml"), backend, &host).unwrap();
    assert_eq!(c.backend.unwrap().addresses.len(), 3, "link-local left out");
    let e = error(&backend.replace("\"auto\"", "\"automatic\""));
    assert_eq!(e.field, "backend.addresses");
}

#[test]
fn a_peers_password_may_come_from_a_file() {
    let dir = std::env::temp_dir().join(format!("vip-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("peer-password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let text = FULL.replace(
        "password = \"secret\"",
        &format!("password_file = \"{}\"", secret.display()),
    );
    let c = parse(Path::new("vip.toml"), &text).unwrap();
    assert_eq!(c.bgp.unwrap().peers[0].password.as_deref(), Some("s3cret"));
    let both = text.replace("password_file", "password = \"x\"\npassword_file");
    assert!(error(&both).message.contains("not both"));
    std::fs::remove_file(&secret).unwrap();
    let e = error(&text);
    assert_eq!(e.field, "bgp.peer[0].password_file");
    assert!(e.message.contains("cannot read"), "{e}");
    let _ = std::fs::remove_dir(&dir);
}

/// Values that mutations put where numbers and addresses stand: edges, overflows, and
/// addresses that are no host's.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "-1",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "18446744074",
    "18446744073709551615",
    "1e308",
    "0.0",
    "nan",
];
const ADDRESSES: &[&str] = &[
    "\"auto\"",
    "\"0.0.0.0\"",
    "\"255.255.255.255\"",
    "\"127.0.0.1\"",
    "\"224.0.0.1\"",
    "\"::\"",
    "\"::1\"",
    "\"ff02::1\"",
    "\"198.19.0.1\"",
    "\"fd00:19::1\"",
    "\"198.18.1.1\"",
    "\"300.1.1.1\"",
    "\"\"",
];

/// 20,000 mutated configs through the parser: none panics, and none of the classes of broken
/// values is accepted (each accepted config is checked field by field).
#[test]
fn fuzz_config() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let seed = rand::rng().random::<u64>();
    let mut rng = StdRng::seed_from_u64(seed);
    assert!(
        parse(Path::new("full.toml"), FULL).is_ok(),
        "{:?}",
        parse(Path::new("full.toml"), FULL)
    );
    let lines: Vec<&str> = FULL.lines().collect();
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..out.len());
            let Some((key, _)) = out[i].split_once(" = ") else {
                continue;
            };
            let key = key.to_owned();
            out[i] = match rng.random_range(0..5) {
                0 => format!("{key} = {}", NUMBERS[rng.random_range(0..NUMBERS.len())]),
                1 => format!(
                    "{key} = {}",
                    ADDRESSES[rng.random_range(0..ADDRESSES.len())]
                ),
                2 => String::new(),
                3 => format!("{key} = \"{}\"", "x".repeat(rng.random_range(0..40))),
                _ => out[rng.random_range(0..lines.len())].clone(),
            };
        }
        let text = out.join("\n");
        let Ok(c) = parse(Path::new("fuzz.toml"), &text) else {
            continue;
        };
        accepted += 1;
        let unicast = |a: IpAddr| {
            !(a.is_unspecified()
                || a.is_multicast()
                || a.is_loopback()
                || a == IpAddr::V4(std::net::Ipv4Addr::BROADCAST))
        };
        let vip_addrs: Vec<IpAddr> = c.vips.iter().map(|v| v.address).collect();
        for v in &c.vips {
            assert!(unicast(v.address), "seed {seed}: VIP {}\n{text}", v.address);
            assert!(
                v.udp_idle_timeout <= Duration::from_secs(86_400),
                "seed {seed}\n{text}"
            );
            assert!(
                v.encapsulation != Encapsulation::Gue || v.gue_port != 0,
                "seed {seed}\n{text}"
            );
            for b in &v.backends {
                assert!(
                    unicast(b.address),
                    "seed {seed}: backend {}\n{text}",
                    b.address
                );
                assert!(!vip_addrs.contains(&b.address), "seed {seed}\n{text}");
                assert!(
                    (100..=599).contains(&b.health.http_status),
                    "seed {seed}\n{text}"
                );
            }
        }
        let n = &c.node;
        for s in [n.source_v4.map(IpAddr::V4), n.source_v6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
        {
            assert!(unicast(s), "seed {seed}: source {s}\n{text}");
        }
        assert!(n.conntrack_entries >= 1024, "seed {seed}\n{text}");
        assert!(
            u64::from(n.table_size) * u64::from(n.table_slots) * 8 <= 4 << 30,
            "seed {seed}\n{text}"
        );
        assert!(n.pin_dir.is_absolute(), "seed {seed}\n{text}");
        assert!(
            n.interfaces.iter().all(|i| !i.is_empty() && i.len() <= 15),
            "seed {seed}\n{text}"
        );
        if let Some(b) = &c.bgp {
            assert!(
                b.asn != 0 && b.peers.iter().all(|p| p.asn != 0),
                "seed {seed}\n{text}"
            );
            assert!(
                b.drain_time <= Duration::from_secs(3_600),
                "seed {seed}\n{text}"
            );
            assert!(
                b.peers
                    .iter()
                    .all(|p| p.password.as_ref().is_none_or(|k| !k.is_empty())),
                "seed {seed}\n{text}"
            );
        }
    }
    assert!(
        accepted > 100,
        "seed {seed}: only {accepted} mutations were valid configs"
    );
}

/// docs/config.md lists exactly the keys the agent accepts, table by table: the agent's own
/// list comes from the parser's answer to an unknown key in each table.
#[test]
fn config_reference_lists_every_key() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md"))
        .expect("docs/config.md");
    // The documented keys under each `## `[table]`` heading.
    let mut documented: Vec<(String, std::collections::BTreeSet<String>)> = Vec::new();
    for line in doc.lines() {
        if let Some(heading) = line.strip_prefix("## `") {
            let table = heading.split('`').next().unwrap_or_default().to_owned();
            documented.push((table, Default::default()));
        } else if let Some(row) = line.strip_prefix("| `")
            && let Some((_, keys)) = documented.last_mut()
        {
            keys.insert(row.split('`').next().unwrap_or_default().to_owned());
        }
    }
    let backend_role = "[node]\nrole = \"backend\"\ninterfaces = [\"eth0\"]\n\
                        [backend]\naddresses = [\"192.0.2.1\"]\n";
    // Where an unknown key lands in each table.
    let probes = [
        (
            "[node]",
            FULL.replacen("[node]\n", "[node]\nzzz_unknown = 1\n", 1),
        ),
        (
            "[[vip]]",
            FULL.replacen("port = 80\n", "port = 80\nzzz_unknown = 1\n", 1),
        ),
        (
            "[[vip.backend]]",
            FULL.replacen("weight = 3\n", "weight = 3\nzzz_unknown = 1\n", 1),
        ),
        (
            "[vip.health]",
            FULL.replacen(
                "http_status = 200\n",
                "http_status = 200\nzzz_unknown = 1\n",
                1,
            ),
        ),
        (
            "[bgp]",
            FULL.replacen("hold_time = 9\n", "hold_time = 9\nzzz_unknown = 1\n", 1),
        ),
        (
            "[[bgp.peer]]",
            FULL.replacen("asn = 65000\n", "asn = 65000\nzzz_unknown = 1\n", 1),
        ),
        (
            "[announce]",
            GOOD.to_owned() + "[announce]\nmode = \"kernel\"\nzzz_unknown = 1\n",
        ),
        ("[backend]", backend_role.to_owned() + "zzz_unknown = 1\n"),
        (
            "[sync]",
            GOOD.to_owned()
                + "[sync]\nlisten = \"198.18.0.2:7180\"\npeers = [\"198.18.0.3:7180\"]\n\
                   key = \"0123456789abcdef\"\nzzz_unknown = 1\n",
        ),
        (
            "[[egress]]",
            format!("{GOOD}{EGRESS}").replacen(
                "block_size = 100\n",
                "block_size = 100\nzzz_unknown = 1\n",
                1,
            ),
        ),
        (
            "[[egress.backend]]",
            format!("{GOOD}{EGRESS}").replacen("block = 0\n", "block = 0\nzzz_unknown = 1\n", 1),
        ),
    ];
    assert_eq!(
        documented.len(),
        probes.len(),
        "{:?}",
        documented.iter().map(|d| &d.0).collect::<Vec<_>>()
    );
    for (table, text) in probes {
        let message = error(&text).message;
        let accepted: std::collections::BTreeSet<String> = message
            .split_once("expected")
            .unwrap_or_else(|| panic!("{table}: {message}"))
            .1
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        let (_, keys) = documented
            .iter()
            .find(|(t, _)| t.starts_with(table))
            .unwrap_or_else(|| panic!("docs/config.md has no section for {table}"));
        assert_eq!(keys, &accepted, "{table}: documented vs accepted");
    }
}

const EGRESS: &str = r#"
[[egress]]
vip = "198.19.0.1"
ports = "40000-40999"
block_size = 100

[[egress.backend]]
address = "198.18.1.1"
block = 0

[[egress.backend]]
address = "198.18.1.3"
block = 7
"#;

#[test]
fn egress_sections_give_each_backend_its_block() {
    let c = parse(Path::new("vip.toml"), &format!("{GOOD}{EGRESS}")).unwrap();
    let e = &c.egress[0];
    assert_eq!(
        (e.first_port, e.last_port, e.block_size),
        (40_000, 40_999, 100)
    );
    assert_eq!(e.blocks(), 10);
    assert_eq!(e.block_ports(7), (40_700, 40_799));
    assert_eq!(e.rest, Duration::from_secs(DEFAULT_EGRESS_REST_SECS));
}

#[test]
fn egress_mistakes_are_refused_with_what_is_allowed() {
    let with = |from: &str, to: &str| error(&format!("{GOOD}{}", EGRESS.replace(from, to)));
    let e = with("40000-40999", "79-1078");
    assert_eq!(e.field, "egress[0].ports");
    assert!(
        e.to_string()
            .contains("vip[0] (tcp/198.19.0.1:80) serves port 80"),
        "{e}"
    );
    let e = with("block_size = 100", "block_size = 300");
    assert!(e.to_string().contains("whole number of blocks"), "{e}");
    let e = with("block = 7", "block = 0");
    assert!(
        e.to_string()
            .contains("block 0 is already another backend's"),
        "{e}"
    );
    let e = with("block = 7", "block = 10");
    assert!(e.to_string().contains("blocks 0 to 9"), "{e}");
    let e = with("vip = \"198.19.0.1\"", "vip = \"198.19.0.2\"");
    assert!(
        e.to_string().contains("no [[vip]] address of this node"),
        "{e}"
    );
    let e = with("40000-40999", "40999-40000");
    assert!(e.to_string().contains("not a port range FIRST-LAST"), "{e}");
    // A VIP that serves every port leaves none for egress.
    let e = error(&format!(
        "{}{EGRESS}",
        GOOD.replace("port = 80", "port = 0")
    ));
    assert!(e.to_string().contains("serves every port"), "{e}");
}

#[test]
fn a_backend_takes_egress_sections_of_its_own_vips_only() {
    let backend = r#"
[node]
role = "backend"
interfaces = ["eth0"]

[backend]
addresses = ["198.18.1.1"]
vips = ["198.19.0.1"]
"#;
    let c = parse(Path::new("vip.toml"), &format!("{backend}{EGRESS}")).unwrap();
    assert_eq!(c.egress.len(), 1);
    let e = error(&format!(
        "{}{EGRESS}",
        backend.replace("vips = [\"198.19.0.1\"]", "vips = [\"198.19.0.9\"]")
    ));
    assert!(e.to_string().contains("is not in backend.vips"), "{e}");
}

#[test]
fn sync_takes_a_key_of_the_tier_and_other_nodes_as_peers() {
    let sync = "[sync]\nlisten = \"198.18.0.2:7180\"\npeers = [\"198.18.0.3:7180\"]\n";
    let c = parse(
        Path::new("vip.toml"),
        &format!("{GOOD}{sync}key = \"0123456789abcdef\"\n"),
    )
    .unwrap();
    let s = c.sync.unwrap();
    assert_eq!(s.key, b"0123456789abcdef");
    assert_eq!(s.refresh, Duration::from_secs(DEFAULT_SYNC_REFRESH_SECS));
    assert!(!format!("{s:?}").contains("0123"), "the key never shows");
    let e = error(&format!("{GOOD}{sync}key = \"short\"\n"));
    assert!(e.to_string().contains("at least 16"), "{e}");
    let e = error(&format!("{GOOD}{sync}"));
    assert!(e.to_string().contains("`key`"), "{e}");
    let e = error(&format!(
        "{GOOD}{}key = \"0123456789abcdef\"\n",
        sync.replace("198.18.0.3:7180", "198.18.0.2:7180")
    ));
    assert!(e.to_string().contains("this node's own sync.listen"), "{e}");
}
