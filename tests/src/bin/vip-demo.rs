//! `cargo xtask demo` and `cargo xtask lab up|down|status`: the vip lab with real traffic.
//!
//! The demo brings the lab up (client, BIRD router with ECMP, two LB nodes announcing the VIPs
//! over BGP, three DSR backends), opens many TCP connections and UDP flows to IPv4 and IPv6
//! VIPs, shows how they spread over backends and LB nodes, kills one LB node while long-lived
//! connections are open, measures how long the router takes to move traffic, shows that the
//! connections survived, and tears everything down.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use vip_tests::lab::{self, Lab, LabSpec, VIP4, VIP6, echo_all, tcp_hello, udp_hello};

const PREFIX: &str = "vipdemo";
const TCP_FLOWS: usize = 300;
const UDP_FLOWS: usize = 200;
const LONG_LIVED: usize = 40;
const TIMEOUT: Duration = Duration::from_secs(3);

fn up() -> Result<Lab> {
    Lab::up_built(LabSpec::new(PREFIX)).context("bringing the lab up")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["demo"] => demo(),
        ["lab", "up"] => up().map(|lab| {
            print!("{}", lab::status(PREFIX));
            println!("logs and configs: /run/{PREFIX}; `cargo xtask lab down` removes it");
            lab.keep();
        }),
        ["lab", "down"] => lab::down(PREFIX).context("removing the lab"),
        ["lab", "status"] => {
            print!("{}", lab::status(PREFIX));
            Ok(())
        }
        ["serve", "--netns", ns, "--name", name, "--address", own] => {
            lab::serve(ns, name, own).context("serving")
        }
        _ => Err(anyhow::anyhow!(
            "usage: vip-demo demo | lab up|down|status | serve --netns NS --name NAME --address A"
        )),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn demo() -> Result<()> {
    println!(
        "== building the lab: client, router (BIRD, ECMP), 2 LB nodes (XDP + BGP), 3 backends (DSR)"
    );
    let mut lab = up()?;
    for vip in [VIP4, VIP6] {
        println!(
            "   router's route to {vip}, learned over BGP: {}",
            one_line(&lab.router_route(vip))
        );
    }

    println!(
        "\n== {TCP_FLOWS} TCP connections and {UDP_FLOWS} UDP flows per VIP family, from the client"
    );
    let (spread, wrong_source) = lab.in_client(|| {
        let mut spread: BTreeMap<String, [usize; 4]> = BTreeMap::new();
        let mut wrong_source = 0;
        for (col, vip) in [(0, VIP4), (1, VIP6)] {
            let client = if vip == VIP4 {
                "198.18.0.10"
            } else {
                "fd00:18::10"
            };
            let vip: IpAddr = vip.parse().unwrap();
            for _ in 0..TCP_FLOWS {
                let (_, backend, seen) =
                    tcp_hello(vip, TIMEOUT).with_context(|| format!("TCP to {vip}"))?;
                wrong_source += usize::from(seen != client);
                spread.entry(backend).or_default()[col] += 1;
            }
            for i in 0..UDP_FLOWS {
                let (backend, seen) = udp_hello(vip, &format!("flow {i}"), TIMEOUT)
                    .with_context(|| format!("UDP to {vip}"))?;
                wrong_source += usize::from(seen != client);
                spread.entry(backend).or_default()[col + 2] += 1;
            }
        }
        anyhow::Ok((spread, wrong_source))
    })?;
    println!(
        "   {:<10} {:>9} {:>9} {:>9} {:>9}",
        "backend", "TCP IPv4", "TCP IPv6", "UDP IPv4", "UDP IPv6"
    );
    for (backend, c) in &spread {
        println!(
            "   {backend:<10} {:>9} {:>9} {:>9} {:>9}",
            c[0], c[1], c[2], c[3]
        );
    }
    let total: usize = spread.values().map(|c| c.iter().sum::<usize>()).sum();
    if total != 2 * (TCP_FLOWS + UDP_FLOWS) || wrong_source > 0 {
        bail!("{total} flows answered, {wrong_source} saw a wrong client address");
    }
    println!("   every flow answered; every backend saw the client's own address; replies went");
    println!("   backend → router → client directly (DSR): the LB nodes only see the inbound half");
    println!("\n   {:<8} {:>28}", "LB node", "packets sent to backends");
    for i in 1..=2 {
        println!("   lb{i:<6} {:>28}", lab.lb_forwarded(i));
    }

    println!("\n== {LONG_LIVED} long-lived connections; then LB node lb1 dies abruptly");
    let mut conns = lab.in_client(|| {
        (0..LONG_LIVED)
            .map(|i| {
                let vip: IpAddr = if i % 2 == 0 { VIP4 } else { VIP6 }.parse().unwrap();
                tcp_hello(vip, TIMEOUT)
                    .map(|(s, _, _)| s)
                    .with_context(|| format!("TCP to {vip}"))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let lb1_before = lab.lb_forwarded(1);
    println!(
        "   before: {}/{LONG_LIVED} echo",
        echo_all(&mut conns, "before")
    );
    let before = lab.lb_forwarded(1);
    println!(
        "   lb1 carried {} packets of those echoes, lb2 the rest",
        before - lb1_before
    );
    lab.kill_lb(1).context("killing lb1")?;
    let killed = Instant::now();
    while lab.router_next_hops(VIP4) > 1 || lab.router_next_hops(VIP6) > 1 {
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("the router kept lb1: {}", lab.router_route(VIP4));
        }
        thread::sleep(Duration::from_millis(50));
    }
    let converged = killed.elapsed();
    println!(
        "   lb1 killed (agent SIGKILL, router hears nothing from it; it had forwarded {before} packets)"
    );
    println!(
        "   the router withdrew lb1 after {converged:.1?} (BGP hold time 3 s): {}",
        one_line(&lab.router_route(VIP4))
    );
    for s in &conns {
        // TCP retransmissions back off to a few seconds by now.
        let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    }
    let alive = echo_all(&mut conns, "after");
    println!(
        "   after: {alive}/{LONG_LIVED} connections still echo (lb2 picks the same backends: same Maglev table)"
    );
    let fresh = lab.in_client(|| tcp_hello(VIP4.parse().unwrap(), TIMEOUT).map(|(_, b, _)| b));
    println!(
        "   a new connection reaches {}",
        fresh.as_deref().unwrap_or("nothing")
    );
    if alive != LONG_LIVED || fresh.is_err() {
        bail!("connections were lost across the LB node failure");
    }

    println!("\n== tearing the lab down");
    drop(lab);
    println!("   done");
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
