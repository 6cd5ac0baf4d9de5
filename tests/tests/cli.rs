//! The command line as a shell user meets it.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
};

/// Output to a pipe that closes early (`vip-agent ... | head -1`) ends the program quietly,
/// as any Unix tool: no panic about a broken pipe.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    let mut cmd = Command::new(vip_tests::node::agent_bin());
    cmd.args(["maglev", "--size", "65537"]);
    for i in 0..2_000u32 {
        cmd.args(["--backend", &format!("10.{}.{}.1", i >> 8, i & 0xff)]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vip-agent");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("table size"), "{first}");
    // The reader is gone; the agent still has about 2,000 lines to write.
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let _ = child.wait();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `--log-format json`: every log line is one JSON object with a level and a message, for log
/// shippers; text stays the default.
#[test]
fn logs_can_be_json_lines() {
    let lb = vip_tests::node::Netns::new("logjson");
    lb.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    lb.ip(&["link", "set", "up0", "up"]);
    lb.ip(&["link", "set", "up1", "up"]);
    let config = format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.0.2\"\npin_dir = \"{}\"\n\
         table_size = 251\nconntrack_entries = 4096\n\
         [[vip]]\naddress = \"198.19.0.1\"\nprotocol = \"tcp\"\nport = 80\n\
         [[vip.backend]]\naddress = \"198.18.0.9\"\n",
        lb.pin_dir.display()
    );
    let mut agent =
        vip_tests::node::Agent::start(&lb, &config, &["--cleanup", "--log-format", "json"]);
    agent.wait_for_log("serving /metrics", 1);
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(), "{}", agent.log_text());
    let log = agent.log_text();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
}
