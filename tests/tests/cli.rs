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
