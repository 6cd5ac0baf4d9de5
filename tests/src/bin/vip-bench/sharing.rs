//! Flow-state sharing: what a scan of conntrack costs, and how long exceptions take from a
//! table change to a peer's conntrack, through the agent's own code (scan, wire, apply) and two
//! services talking over loopback TCP.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use vip_agent::{
    apply::{Applied, Capacity, Lookup, Target},
    config::{self, Config, SyncConfig},
    sync::{Listener, Received, Sync, exceptions},
};
use vip_common::{ConnEntry, FlowKey, IPPROTO_TCP, hash::flow_hash, layout::DEFAULT_TABLE_SIZE};
use vip_tests::fixture::Lb;

/// Flows tracked for the scan's cost.
const TRACKED: u32 = 1_000_000;

/// A load balancer with the agent's own applied state: one VIP, four backends.
struct Node {
    lb: Lb,
    applied: Applied,
}

fn config() -> Config {
    let mut text = "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"198.18.0.2\"\n\
                    [[vip]]\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = 80\n"
        .to_string();
    for b in 1..=4 {
        text += &format!("[[vip.backend]]\naddress = \"198.18.1.{b}\"\n");
    }
    config::parse(Path::new("bench.toml"), &text).expect("bench config")
}

impl Node {
    fn new(conntrack_entries: u32) -> Self {
        let mut lb = Lb::with_sizes(DEFAULT_TABLE_SIZE, conntrack_entries);
        let mut applied = Applied::new(Capacity::from(lb.dataplane.options()));
        applied
            .apply(
                &Target::configured(&config()),
                &Default::default(),
                &mut lb.dataplane,
            )
            .expect("apply");
        Self { lb, applied }
    }
}

/// `n` flows to the VIP, every `1 / exception_every`-th tracked to a backend the table does
/// not give it (the others to the one it does).
fn track(node: &mut Node, n: u32, exception_every: u32) {
    let lookup = node.applied.lookup();
    let vip: IpAddr = "198.18.100.1".parse().unwrap();
    let key = vip_common::VipKey::new(vip, IPPROTO_TCP, 80);
    let meta = *lookup.vip(&key).expect("VIP applied");
    let table = lookup.table(&key).expect("table");
    let ids: Vec<_> = (1..=4)
        .map(|b| {
            let addr: IpAddr = format!("198.18.1.{b}").parse().unwrap();
            *lookup.backend(&(key, addr)).expect("backend")
        })
        .collect();
    for seq in 0..n {
        let mut flow = FlowKey::v4(
            (0x0a00_0000u32 + seq / 60_000).to_be_bytes(),
            [198, 18, 100, 1],
            IPPROTO_TCP,
        );
        flow.set_ports(
            (1024 + (seq % 60_000) as u16).to_be_bytes(),
            80u16.to_be_bytes(),
        );
        let hash = flow_hash(&flow, meta.hash_port_mask);
        let answer = table.lookup(hash);
        let (id, backend) = if seq % exception_every == 0 {
            *ids.iter().find(|(id, _)| *id != answer).unwrap()
        } else {
            *ids.iter().find(|(id, _)| *id == answer).unwrap()
        };
        let entry = ConnEntry {
            backend: id,
            vip_id: meta.vip_id,
            last_seen_ns: exceptions::now_ns(),
            flow_hash: hash,
            backend_tag: backend.tag,
            flags: 0,
        };
        node.lb
            .dataplane
            .insert_flow(&flow, &entry)
            .expect("track a flow");
    }
}

/// The scan: all conntrack entries read and checked against the tables.
fn scan(node: &Node) -> (Vec<vip_agent::sync::wire::Entry>, usize, Duration) {
    let started = Instant::now();
    let flows = node.lb.dataplane.flows().expect("read conntrack");
    let found = exceptions::exceptions(&node.applied.lookup(), &flows, exceptions::now_ns());
    (found, flows.len(), started.elapsed())
}

/// Process CPU time so far (user + system).
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` and a struct to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// From the scan's start to the receiver's conntrack holding every exception: (wall time, CPU
/// time of both ends, bytes on the wire).
fn share(sender: &Node, receiver: &mut Node, port: u16) -> (Duration, Duration, u64, usize) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    runtime.block_on(async {
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let settings = |listen: u16, peer: u16| SyncConfig {
            listen: at(listen),
            peers: vec![at(peer)],
            key: b"the benchmark's tier key".to_vec(),
            max_entries_per_second: 10_000_000,
            fetch_timeout: Duration::from_secs(3),
            refresh: Duration::from_secs(3600),
        };
        let (from, to) = (settings(port, port + 1), settings(port + 1, port));
        let (sending, _) = Sync::start(&from, Listener::bind(from.listen).await.unwrap());
        let (receiving, mut received) = Sync::start(&to, Listener::bind(to.listen).await.unwrap());
        // The connection is up and has pushed the empty set once.
        loop {
            if let Some(Received::Synced { .. }) = received.recv().await {
                break;
            }
        }
        let (cpu0, started) = (cpu_time(), Instant::now());
        let (found, _, _) = scan(sender);
        let count = found.len();
        sending.publish(found);
        let lookup: Lookup = receiver.applied.lookup();
        let mut applied = 0;
        while let Some(message) = received.recv().await {
            match message {
                Received::Entries { entries, .. } => {
                    let now = exceptions::now_ns();
                    for e in &entries {
                        let (flow, entry) =
                            exceptions::entry_for(&lookup, e, |_| None, now).expect("applicable");
                        receiver
                            .lb
                            .dataplane
                            .insert_flow(&flow, &entry)
                            .expect("write");
                        applied += 1;
                    }
                }
                Received::Synced { .. } if applied == count => break,
                Received::Synced { .. } => {}
            }
        }
        let elapsed = started.elapsed();
        let cpu = cpu_time() - cpu0;
        let bytes = sending
            .counters
            .snapshot()
            .peers
            .first()
            .map_or(0, |(_, p)| p.bytes_sent);
        drop((sending, receiving));
        (elapsed, cpu, bytes, count)
    })
}

pub(crate) fn flow_state_sharing(md: &mut String) {
    writeln!(md, "\n## Flow-state sharing\n").unwrap();
    writeln!(
        md,
        "The agent's own code end to end, two services over loopback TCP: the sender scans its \
         conntrack tables and the VIP's Maglev table for exceptions, pushes them (HMAC-SHA256 per \
         frame of up to 4096 entries of 64 bytes), the receiver writes each into its conntrack \
         tables. \
         Time from the scan's start to the receiver holding the last exception; CPU of both \
         ends together; bytes on the wire per exception.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| exceptions (of flows tracked) | table change to peer holding them | CPU per exception | bytes per exception |\n|---|---:|---:|---:|"
    )
    .unwrap();
    for (exceptions, every) in [(1_000u32, 100u32), (100_000, 2)] {
        let tracked = exceptions * every;
        let mut sender = Node::new(1 << 21);
        let mut receiver = Node::new(1 << 21);
        track(&mut sender, tracked, every);
        let (elapsed, cpu, bytes, count) = share(&sender, &mut receiver, 17_180);
        // A bucket that gets a fifth flow keeps four: a few flows of the fill are not tracked.
        assert!(
            (exceptions * 999 / 1_000..=exceptions).contains(&(count as u32)),
            "the scan finds the exceptions: {count} of {exceptions}"
        );
        writeln!(
            md,
            "| {count} (of {tracked}) | {:.0} ms | {:.1} µs | {:.1} |",
            elapsed.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e6 / count as f64,
            bytes as f64 / count as f64
        )
        .unwrap();
    }
    let mut node = Node::new(1 << 22);
    track(&mut node, TRACKED, 10);
    let (found, flows, took) = scan(&node);
    writeln!(
        md,
        "\nThe scan with {flows} flows tracked ({} exceptions): {:.0} ms (conntrack read \
         through the agent's mapping of the tables, each entry checked against its VIP's table). It runs after each table \
         change and every `refresh`, in the agent, never in the datapath: the datapath's \
         figures above are those of a node with sharing on (a peer's entry is an ordinary \
         conntrack entry).",
        found.len(),
        took.as_secs_f64() * 1e3
    )
    .unwrap();
}
