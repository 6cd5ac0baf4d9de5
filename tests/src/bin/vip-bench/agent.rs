//! The real agent at scale: start-up, and changes through SIGHUP with many VIPs or backends.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use vip_common::{IPPROTO_TCP, layout::DEFAULT_TABLE_SIZE};

use crate::harness::median;

/// Time from `vip-agent run` until its program is attached with the maps filled (start-up's last
/// step), for 100 VIPs × 10 backends at the default table size: cold, and restarted over the
/// pinned state its predecessor left (where the datapath never stopped forwarding).
pub(crate) fn agent_startup(md: &mut String) {
    use vip_tests::node::Netns;
    const VIPS: u32 = 100;
    const RUNS: usize = 5;
    let (lb, _gateway) = Netns::lb_with_gateway("bench");
    let mut config = format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.0.2\"\npin_dir = \"{}\"\n\
         table_slots = {}\n",
        lb.pin_dir.display(),
        VIPS + 8
    );
    for i in 0..VIPS {
        config += &format!(
            "\n[[vip]]\naddress = \"198.19.0.{}\"\nprotocol = \"tcp\"\nport = 80\n",
            1 + i
        );
        for b in 0..10 {
            config += &format!(
                "[[vip.backend]]\naddress = \"198.18.128.{}\"\n",
                1 + (i + b) % 250
            );
        }
    }
    // --cleanup: the agent removes its pins when it stops, so the next start is cold.
    let started = || {
        let (took, agent) = start_agent(&lb, &config);
        (took.as_secs_f64() * 1e3, agent)
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (ms, mut first) = started();
        cold.push(ms);
        // Killed, not stopped: its pins stay, as after a crash or an upgrade.
        first.kill();
        let (ms, mut second) = started();
        assert!(
            second.log_text().contains("took over pinned state"),
            "{}",
            second.log_text()
        );
        warm.push(ms);
        second.signal(libc::SIGTERM);
        assert!(second.wait(), "{}", second.log_text());
    }
    writeln!(
        md,
        "\n## Agent start-up ({VIPS} VIPs × 10 backends, table size {DEFAULT_TABLE_SIZE}, median of {RUNS})\n"
    )
    .unwrap();
    writeln!(
        md,
        "From `vip-agent run` to the program attached with every map filled. On a restart the \
         old program keeps forwarding from its pinned maps the whole time.\n"
    )
    .unwrap();
    writeln!(md, "| start | ms |\n|---|---:|").unwrap();
    writeln!(md, "| cold (nothing pinned) | {:.0} |", median(cold)).unwrap();
    writeln!(md, "| restart over pinned state | {:.0} |", median(warm)).unwrap();
}

/// The agent's node config for the control-plane runs: room for `vips` VIPs with `backends`
/// backends each, plus spares for the changes.
fn scale_node(
    lb: &vip_tests::node::Netns,
    table_size: u32,
    vips: usize,
    backends: usize,
) -> String {
    format!(
        "[node]\ninterfaces = [\"up0\"]\nsource_v4 = \"198.18.0.2\"\npin_dir = \"{}\"\n\
         table_size = {table_size}\ntable_slots = {}\nmax_vips = {}\nmax_backends = {}\n",
        lb.pin_dir.display(),
        vips + 8,
        vips + 8,
        (vips + 8) * backends + 64
    )
}

/// VIP `i` of the scale runs: 198.19.0.1, 198.19.0.2, ... (250 per /24).
fn scale_vip(i: usize, backends: &[String]) -> String {
    let mut v = format!(
        "\n[[vip]]\naddress = \"198.19.{}.{}\"\nprotocol = \"tcp\"\nport = 80\n",
        i / 250,
        1 + i % 250
    );
    for b in backends {
        v += &format!("[[vip.backend]]\naddress = \"{b}\"\n");
    }
    v
}

/// Backend address `i`: 198.18.128.1, ... (250 per /24).
fn scale_backend(i: usize) -> String {
    format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250)
}

/// Starts the agent (`--cleanup`: its pins go when it stops) and waits until it has attached,
/// or taken over a running attachment: the time that took.
fn start_agent(lb: &vip_tests::node::Netns, config: &str) -> (Duration, vip_tests::node::Agent) {
    let t = Instant::now();
    let mut agent = vip_tests::node::Agent::start(lb, config, &["--cleanup"]);
    while !agent.log_text().contains("attached") && !agent.log_text().contains("no gap") {
        assert!(agent.running(), "agent exited: {}", agent.log_text());
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    (t.elapsed(), agent)
}

/// Rewrites the config, sends SIGHUP and waits until `live` says the change is in the maps:
/// the time from the signal to that.
fn reload_until(
    agent: &vip_tests::node::Agent,
    config: &str,
    mut live: impl FnMut() -> bool,
) -> Duration {
    agent.rewrite_config(config);
    let t = Instant::now();
    agent.signal(libc::SIGHUP);
    while !live() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    t.elapsed()
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Control plane at scale, through the real agent: a node with 10,000 VIPs (start-up, memory,
/// adding and removing one VIP) and a VIP with 1,000 backends (replacing one), each from SIGHUP
/// to the change being live in the pinned maps.
pub(crate) fn control_plane(md: &mut String) {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use vip_common::{VipKey, VipMeta, layout};
    const VIPS: usize = 10_000;
    const SMALL_TABLE: u32 = 1021;
    const BACKENDS: usize = 1_000;
    const RUNS: usize = 5;
    let (lb, _gateway) = vip_tests::node::Netns::lb_with_gateway("cplane");
    let vips_map = |lb: &vip_tests::node::Netns| {
        let data = MapData::from_pin(lb.pin_dir.join(layout::VIPS)).expect("pinned VIPS");
        BpfHashMap::<MapData, VipKey, VipMeta>::try_from(Map::HashMap(data)).expect("VIPS")
    };
    let key = |i: usize| {
        VipKey::new(
            format!("198.19.{}.{}", i / 250, 1 + i % 250)
                .parse()
                .unwrap(),
            IPPROTO_TCP,
            80,
        )
    };

    // 10,000 VIPs, two backends each.
    let pair = |i: usize| [scale_backend(i % 250), scale_backend((i + 1) % 250)];
    let base: String = (0..VIPS).map(|i| scale_vip(i, &pair(i))).collect();
    let node = scale_node(&lb, SMALL_TABLE, VIPS + 1, 2);
    let config = format!("{node}{base}");
    let with_one_more = format!("{config}{}", scale_vip(VIPS, &pair(VIPS)));
    let (startup, agent) = start_agent(&lb, &config);
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_mib(agent.pid());
    let map = vips_map(&lb);
    let (mut adds, mut removes) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        adds.push(reload_until(&agent, &with_one_more, || {
            map.get(&key(VIPS), 0).is_ok()
        }));
        removes.push(reload_until(&agent, &config, || {
            map.get(&key(VIPS), 0).is_err()
        }));
    }
    agent.signal(libc::SIGTERM);
    let mut agent = agent;
    assert!(agent.wait(), "{}", agent.log_text());

    // One VIP with 1,000 backends at the default table size; replace one of them.
    let backends: Vec<String> = (0..BACKENDS).map(scale_backend).collect();
    let mut replaced = backends.clone();
    replaced[BACKENDS / 2] = scale_backend(BACKENDS);
    let node = scale_node(&lb, DEFAULT_TABLE_SIZE, 1, BACKENDS + 1);
    let config = format!("{node}{}", scale_vip(0, &backends));
    let changed = format!("{node}{}", scale_vip(0, &replaced));
    let (_, agent) = start_agent(&lb, &config);
    let map = vips_map(&lb);
    let table = || map.get(&key(0), 0).expect("the VIP").table;
    let mut swaps = Vec::new();
    for run in 0..RUNS * 2 {
        let before = table();
        let next = if run % 2 == 0 { &changed } else { &config };
        swaps.push(reload_until(&agent, next, || table() != before));
    }
    agent.signal(libc::SIGTERM);
    let mut agent = agent;
    assert!(agent.wait(), "{}", agent.log_text());

    let ms = |v: Vec<Duration>| median(v.iter().map(|d| d.as_secs_f64() * 1e3).collect());
    writeln!(md, "\n## Control plane at scale (median of {RUNS})\n").unwrap();
    writeln!(
        md,
        "The real agent in a namespace. A change is timed from SIGHUP (config re-read, \
         validated, diffed, applied) until the pinned maps show it: the VIP in `VIPS`, or the \
         VIP pointing at its new Maglev table.\n"
    )
    .unwrap();
    writeln!(md, "| what | ms |\n|---|---:|").unwrap();
    writeln!(
        md,
        "| start-up with {VIPS} VIPs × 2 backends, table size {SMALL_TABLE} (cold, once) | {:.0} |",
        startup.as_secs_f64() * 1e3
    )
    .unwrap();
    writeln!(md, "| add 1 VIP to {VIPS} | {:.1} |", ms(adds)).unwrap();
    writeln!(md, "| remove it again | {:.1} |", ms(removes)).unwrap();
    writeln!(
        md,
        "| replace 1 of {BACKENDS} backends of a VIP, table size {DEFAULT_TABLE_SIZE} | {:.1} |",
        ms(swaps)
    )
    .unwrap();
    writeln!(
        md,
        "\nAgent memory (RSS) at idle with {VIPS} VIPs: {rss:.1} MiB. The datapath's Maglev map \
         for them takes {:.0} MiB more, in the kernel ({} table slots × {SMALL_TABLE} entries × \
         8 bytes).",
        ((VIPS + 9) as f64 * f64::from(SMALL_TABLE) * 8.0) / (1024.0 * 1024.0),
        VIPS + 9
    )
    .unwrap();
}
