//! The backends' services and the client's side of them.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use super::{
    TCP_PORT, UDP_PORT, VIP4, VIP6,
    error::{LabError, Result, io},
    shell::{enter, in_namespace},
};

/// The backends' services (run as `vip-demo serve --netns NS --name NAME --address ADDR`): a TCP
/// service on every address (the VIPs on lo, and the backend's own for health checks) that greets
/// each connection with "NAME CLIENT-ADDRESS" and echoes, and a UDP service that answers
/// "NAME CLIENT-ADDRESS PAYLOAD", bound to each VIP (so replies leave from the VIP) and to the
/// backend's own address.
pub fn serve(ns: &str, name: &str, own: &str) -> Result<()> {
    enter(ns)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let bind = |f: &dyn Fn() -> std::io::Result<()>| -> Result<()> {
        loop {
            match f() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(io(format!("binding in {ns}"))(e));
                }
                // The agent has not put the VIPs on lo yet.
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    let label = name.to_owned();
    // One dual-stack wildcard listener: the accepted socket's local address is the VIP for
    // client connections, the backend's own address for health checks.
    bind(&|| {
        let tcp = TcpListener::bind(SocketAddr::new("::".parse().expect("any"), TCP_PORT))?;
        let label = label.clone();
        thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                let label = label.clone();
                thread::spawn(move || serve_tcp(stream, &label));
            }
        });
        Ok(())
    })?;
    for udp_addr in [VIP4, VIP6, own] {
        let addr: IpAddr = udp_addr
            .parse()
            .map_err(|_| LabError::Address(udp_addr.to_owned()))?;
        let label = name.to_owned();
        bind(&|| {
            let udp = UdpSocket::bind(SocketAddr::new(addr, UDP_PORT))?;
            let label = label.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let mut reply = format!("{label} {} ", from.ip()).into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = udp.send_to(&reply, from);
                }
            });
            Ok(())
        })?;
    }
    loop {
        thread::park();
    }
}

fn serve_tcp(mut stream: TcpStream, label: &str) {
    use std::io::{Read, Write};
    let peer = stream
        .peer_addr()
        .map(|a| a.ip().to_canonical().to_string())
        .unwrap_or_default();
    let _ = stream.write_all(format!("{label} {peer}\n").as_bytes());
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Client side: a TCP connection to a VIP and the greeting (backend, address it saw).
pub fn tcp_hello(vip: IpAddr, timeout: Duration) -> std::io::Result<(TcpStream, String, String)> {
    use std::io::BufRead;
    let addr = SocketAddr::new(vip, TCP_PORT);
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    std::io::BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let backend = parts.next().unwrap_or_default().to_owned();
    let seen = parts.next().unwrap_or_default().to_owned();
    Ok((stream, backend, seen))
}

/// Client side: one UDP flow (its own socket and port); returns (backend, address it saw).
pub fn udp_hello(
    vip: IpAddr,
    payload: &str,
    timeout: Duration,
) -> std::io::Result<(String, String)> {
    let bind: SocketAddr = if vip.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(SocketAddr::new(vip, UDP_PORT))?;
    socket.send(payload.as_bytes())?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    let mut parts = reply.splitn(3, ' ');
    let backend = parts.next().unwrap_or_default().to_owned();
    let seen = parts.next().unwrap_or_default().to_owned();
    if parts.next() != Some(payload) {
        return Err(std::io::Error::other(format!(
            "UDP echo mismatch: {reply:?}"
        )));
    }
    Ok((backend, seen))
}

/// Sends a line on each connection; returns how many echoed it back.
pub fn echo_all(streams: &mut [TcpStream], tag: &str) -> usize {
    use std::io::{Read, Write};
    let mut ok = 0;
    for (i, s) in streams.iter_mut().enumerate() {
        let msg = format!("ping {i} {tag}\n");
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

/// A server outside the data centre, in namespace `ns` on `port` (TCP and UDP, both families),
/// for backends' egress connections: a TCP connection is greeted with the source it came from
/// (`ADDRESS:PORT`), then echoed; a datagram is answered with `ADDRESS:PORT PAYLOAD`. Runs on
/// threads of this process until it exits; returns once listening.
pub fn serve_outside(ns: &str, port: u16) -> Result<()> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let ns = ns.to_owned();
    thread::spawn(move || {
        let bound = (|| -> Result<(TcpListener, UdpSocket)> {
            enter(&ns)?;
            let any = SocketAddr::new("::".parse().expect("any"), port);
            let tcp = TcpListener::bind(any).map_err(io(format!("TCP {port} in {ns}")))?;
            let udp = UdpSocket::bind(any).map_err(io(format!("UDP {port} in {ns}")))?;
            Ok((tcp, udp))
        })();
        let (tcp, udp) = match bound {
            Ok(b) => b,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                let mut reply = format!("{from} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = udp.send_to(&reply, from);
            }
        });
        let _ = ready_tx.send(Ok(()));
        for stream in tcp.incoming().flatten() {
            thread::spawn(move || {
                use std::io::{Read, Write};
                let mut stream = stream;
                let Ok(peer) = stream.peer_addr() else { return };
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let _ = stream.write_all(format!("{peer}\n").as_bytes());
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    ready
        .recv()
        .map_err(|_| LabError::NotReached("the outside server's thread ended".into()))?
}

/// From inside namespace `ns` (a backend), `n` TCP connections from `source` (a VIP on its
/// `lo`) to `server`, each given `timeout`; returns each connection (or why it failed) with
/// the source the server saw.
pub fn egress_tcp(
    ns: &str,
    source: IpAddr,
    server: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Vec<std::io::Result<(TcpStream, SocketAddr)>> {
    in_namespace(ns, move || {
        (0..n)
            .map(|_| {
                use std::io::BufRead;
                let domain = socket2::Domain::for_address(server);
                let socket = socket2::Socket::new(
                    domain,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                socket.bind(&SocketAddr::new(source, 0).into())?;
                socket.connect_timeout(&server.into(), timeout)?;
                let stream: TcpStream = socket.into();
                stream.set_read_timeout(Some(timeout))?;
                let mut line = String::new();
                std::io::BufReader::new(stream.try_clone()?).read_line(&mut line)?;
                let seen = line
                    .trim()
                    .parse()
                    .map_err(|_| std::io::Error::other(format!("greeting {line:?}")))?;
                Ok((stream, seen))
            })
            .collect()
    })
}

/// From inside namespace `ns`, `n` UDP flows (a socket each) from `source` to `server`, one
/// datagram each; returns for each its socket and the source the server saw, or why there was
/// no answer.
pub fn egress_udp(
    ns: &str,
    source: IpAddr,
    server: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Vec<std::io::Result<(UdpSocket, SocketAddr)>> {
    in_namespace(ns, move || {
        let sockets: Vec<std::io::Result<UdpSocket>> = (0..n)
            .map(|i| {
                let socket = UdpSocket::bind(SocketAddr::new(source, 0))?;
                socket.set_read_timeout(Some(timeout))?;
                socket.connect(server)?;
                socket.send(format!("flow {i}").as_bytes())?;
                Ok(socket)
            })
            .collect();
        sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                let socket = socket?;
                let mut buf = [0u8; 1500];
                let len = socket.recv(&mut buf)?;
                let reply = String::from_utf8_lossy(&buf[..len]);
                let (seen, payload) = reply
                    .split_once(' ')
                    .ok_or_else(|| std::io::Error::other(format!("reply {reply:?}")))?;
                if payload != format!("flow {i}") {
                    return Err(std::io::Error::other(format!("reply {reply:?}")));
                }
                let seen = seen
                    .parse()
                    .map_err(|_| std::io::Error::other(format!("reply {reply:?}")))?;
                Ok((socket, seen))
            })
            .collect()
    })
}

/// From inside namespace `ns`, an ICMP echo request (ICMPv6 for IPv6) from `source` to `dest`
/// with identifier `id`, over a raw socket; waits for the echo reply with that identifier (the
/// backend's NAT maps it into its block and back).
pub fn egress_ping(
    ns: &str,
    source: IpAddr,
    dest: IpAddr,
    id: u16,
    timeout: Duration,
) -> std::io::Result<()> {
    in_namespace(ns, move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let (domain, protocol, request, reply) = if dest.is_ipv4() {
            (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8)
        } else {
            (Domain::IPV6, Protocol::ICMPV6, 128, 129)
        };
        let socket = Socket::new(domain, Type::RAW, Some(protocol))?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.set_read_timeout(Some(timeout))?;
        let mut packet = vec![request, 0, 0, 0];
        packet.extend_from_slice(&id.to_be_bytes());
        packet.extend_from_slice(&[0, 1]);
        packet.extend_from_slice(b"vip egress ping");
        // ICMPv6's checksum covers a pseudo-header: the kernel fills it in for raw ICMPv6.
        if dest.is_ipv4() {
            let sum = !vip_common::checksum::fold_sum(&packet);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        socket.send_to(&packet, &SocketAddr::new(dest, 0).into())?;
        let deadline = Instant::now() + timeout;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while Instant::now() < deadline {
            let n = socket.recv(&mut buf)?;
            // SAFETY: `recv` initialised the first `n` bytes.
            let got: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            // Raw IPv4 sockets deliver the IP header too.
            let icmp = if dest.is_ipv4() {
                &got[usize::from(got[0] & 0x0f) * 4..]
            } else {
                &got[..]
            };
            if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id.to_be_bytes() {
                return Ok(());
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no echo reply",
        ))
    })
}
