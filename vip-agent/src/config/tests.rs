//! Config parsing and validation, error messages included.

use std::{path::PathBuf, time::Duration};

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
    assert_eq!(e.line, Some(17));
    assert_eq!(e.field, "vip[0].backend[1].weight");
    assert!(
        e.to_string()
            .starts_with("vip.toml:17: vip[0].backend[1].weight: 5000"),
        "{e}"
    );

    let e = error(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
    assert_eq!(e.line, Some(9));
    assert_eq!(e.field, "vip[0].protocol");
    assert!(
        e.message.contains("tcp") && e.message.contains("udp"),
        "{e}"
    );

    let e = error(&GOOD.replace("state = \"draining\"", "state = \"gone\""));
    assert_eq!(e.field, "vip[0].backend[1].state");

    let e = error(&GOOD.replace("table_size = 251", "table_size = 250"));
    assert_eq!((e.line, e.field.as_str()), (Some(5), "node.table_size"));

    let e = error(&GOOD.replace("address = \"198.18.1.2\"", "address = \"198.18.1.1\""));
    assert_eq!(
        (e.line, e.field.as_str()),
        (Some(16), "vip[0].backend[1].address")
    );

    let e = error(&GOOD.replace("source_v4 = \"198.18.0.2\"\n", ""));
    assert!(e.message.contains("node.source_v4"), "{e}");

    let e = error(&GOOD.replace("port = 80", "port = 80\ncolour = \"blue\""));
    assert!(e.message.contains("unknown field `colour`"), "{e}");

    let e = error(&GOOD.replace("address = \"198.19.0.1\"", "address = \"198.19.0.300\""));
    assert_eq!(e.line, Some(8));
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
fn duplicate_vip_is_rejected() {
    let twice =
        format!("{GOOD}\n[[vip]]\naddress = \"198.19.0.1\"\nprotocol = \"tcp\"\nport = 80\n");
    let e = error(&twice);
    assert!(e.message.contains("configured twice"), "{e}");
    assert_eq!(e.line, Some(21));
}
