//! `cargo xtask demo`: the lab, real TCP and UDP traffic through the XDP load balancer to
//! backends that answer directly (DSR), how flows spread, and connections that survive the
//! agent being killed and restarted (the pinned datapath keeps forwarding).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::lab::{self, BACKENDS, Lab, TCP_PORT, UDP_PORT, VIP4, VIP6};

const TCP_FLOWS: usize = 300;
const UDP_FLOWS: usize = 300;
const LONG_LIVED: usize = 30;
const TIMEOUT: Duration = Duration::from_secs(3);

pub fn run(agent: &Path, decap_object: &Path) -> Result<()> {
    println!("== vip demo: building the lab (client, router, 1 LB node, {BACKENDS} backends)");
    let mut lab = Lab::up(agent, decap_object)?;
    lab::start_services()?;
    println!("   VIPs {VIP4} (tcp/{TCP_PORT}, udp/{UDP_PORT}) and {VIP6} (tcp/{TCP_PORT})");

    println!(
        "\n== {TCP_FLOWS} TCP connections per VIP family and {UDP_FLOWS} UDP flows from the client"
    );
    let results = in_client(|| {
        let mut spread: BTreeMap<String, [usize; 3]> = BTreeMap::new();
        for (col, vip) in [(0, VIP4), (1, VIP6)] {
            for _ in 0..TCP_FLOWS {
                let (_, backend) = tcp_hello(vip.parse()?)?;
                spread.entry(backend).or_default()[col] += 1;
            }
        }
        for i in 0..UDP_FLOWS {
            let backend = udp_hello(&format!("flow {i}"))?;
            spread.entry(backend).or_default()[2] += 1;
        }
        Ok(spread)
    })?;
    println!(
        "   {:<10} {:>10} {:>10} {:>10}",
        "backend", "TCP IPv4", "TCP IPv6", "UDP IPv4"
    );
    for (backend, [t4, t6, u4]) in &results {
        println!("   {backend:<10} {t4:>10} {t6:>10} {u4:>10}");
    }
    let total: usize = results.values().map(|c| c.iter().sum::<usize>()).sum();
    if results.len() != BACKENDS || total != 2 * TCP_FLOWS + UDP_FLOWS {
        bail!("expected every flow answered and every backend used, got {results:?}");
    }
    println!(
        "   every flow was answered; replies went backend → router → client, not through the LB"
    );

    println!("\n== LB node datapath (vip-agent status)");
    for line in lab.status("lb1")?.lines() {
        println!("   {line}");
    }

    println!("\n== {LONG_LIVED} long-lived connections, then the LB agent is killed (SIGKILL)");
    let mut long_lived = in_client(|| {
        (0..LONG_LIVED)
            .map(|_| tcp_hello(VIP4.parse()?).map(|(s, _)| s))
            .collect::<Result<Vec<_>>>()
    })?;
    lab.kill_agent("lb1")?;
    thread::sleep(Duration::from_millis(500));
    let alive = echo_all(&mut long_lived, "while the agent is down");
    let fresh = in_client(|| tcp_hello(VIP4.parse()?).map(|(_, b)| b));
    println!(
        "   agent down: {alive}/{LONG_LIVED} connections still echo; a new connection {}",
        match &fresh {
            Ok(b) => format!("reached {b}"),
            Err(e) => format!("failed: {e:#}"),
        }
    );
    lab.restart_lb("lb1")?;
    thread::sleep(Duration::from_secs(2));
    let alive_after = echo_all(&mut long_lived, "after the restart");
    println!(
        "   agent restarted (it took over the pinned maps and link): {alive_after}/{LONG_LIVED} still echo"
    );
    if alive != LONG_LIVED || alive_after != LONG_LIVED || fresh.is_err() {
        bail!("connections were lost across the agent restart");
    }

    println!("\n== tearing the lab down");
    drop(lab);
    println!("   done");
    Ok(())
}

/// Runs `f` on a thread inside the client's namespace; sockets it makes stay there.
fn in_client<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    thread::spawn(move || {
        lab::enter(&lab::ns("client"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// Connects to the VIP and reads the greeting: which backend answered.
fn tcp_hello(vip: IpAddr) -> Result<(TcpStream, String)> {
    let addr = SocketAddr::new(vip, TCP_PORT);
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?)
        .read_line(&mut line)
        .with_context(|| format!("greeting from {addr}"))?;
    Ok((stream, line.trim().to_owned()))
}

fn udp_hello(payload: &str) -> Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect((VIP4, UDP_PORT))?;
    socket.send(payload.as_bytes())?;
    let mut buf = [0u8; 1500];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("UDP reply to {payload:?}"))?;
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (backend, echoed) = reply.split_once(' ').context("reply format")?;
    if echoed != payload {
        bail!("UDP echo mismatch: {reply:?}");
    }
    Ok(backend.to_owned())
}

/// Sends a line on each connection and counts the ones that echo it back.
fn echo_all(streams: &mut [TcpStream], when: &str) -> usize {
    let mut ok = 0;
    for (i, s) in streams.iter_mut().enumerate() {
        let msg = format!("ping {i} {when}\n");
        let mut buf = vec![0u8; msg.len()];
        if s.write_all(msg.as_bytes()).is_ok()
            && s.read_exact(&mut buf).is_ok()
            && buf == msg.as_bytes()
        {
            ok += 1;
        }
    }
    ok
}
