//! One health check of one backend: TCP, HTTP(S) or UDP, to the backend's own address or
//! through the data path, with a typed error that says what failed.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
};

use crate::config::{CheckKind, HealthCheck};

/// Where a check's packets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The backend's own address.
    Direct(SocketAddr),
    /// The VIP, from this node's `source` address, with packets marked for `vip_hc`.
    Datapath {
        vip: SocketAddr,
        source: IpAddr,
        mark: u32,
    },
}

impl Target {
    fn address(&self) -> SocketAddr {
        match *self {
            Target::Direct(a) | Target::Datapath { vip: a, .. } => a,
        }
    }

    /// The probe socket's local address and mark.
    fn local(&self) -> (SocketAddr, Option<u32>) {
        match *self {
            Target::Direct(a) => (unspecified(a), None),
            Target::Datapath { source, mark, .. } => (SocketAddr::new(source, 0), Some(mark)),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Direct(a) => write!(f, "{a}"),
            Target::Datapath { vip, .. } => write!(f, "{vip} through the data path"),
        }
    }
}

/// What went wrong in a check.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connecting")]
    Connect(#[source] std::io::Error),
    #[error("TLS handshake")]
    Tls(#[source] std::io::Error),
    #[error("sending")]
    Send(#[source] std::io::Error),
    #[error("receiving")]
    Receive(#[source] std::io::Error),
    #[error("{path}: status {got}, want {want}")]
    Status { path: String, got: u16, want: u16 },
    #[error("no HTTP status line")]
    NoStatusLine,
    #[error("the reply lacks {0:?}")]
    UnexpectedReply(String),
    #[error("server name {0:?} is not valid")]
    ServerName(String),
}

/// A failed check: which check, to where, and the failure as its source.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {target}")]
pub(crate) struct ProbeError {
    pub kind: &'static str,
    pub target: String,
    #[source]
    pub failure: Failure,
}

fn unspecified(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Marks every packet of a socket (SO_MARK; needs CAP_NET_ADMIN).
fn set_mark(socket: &impl AsRawFd, mark: u32) -> std::io::Result<()> {
    crate::net::sockopt::set(socket, libc::SOL_SOCKET, libc::SO_MARK, &mark)
}

async fn tcp_connect(target: &Target) -> std::io::Result<TcpStream> {
    let (local, mark) = target.local();
    let socket = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        set_mark(&socket, mark)?;
        socket.bind(local)?;
    }
    socket.connect(target.address()).await
}

async fn udp_connect(target: &Target) -> std::io::Result<UdpSocket> {
    let (local, mark) = target.local();
    let socket = UdpSocket::bind(local).await?;
    if let Some(mark) = mark {
        set_mark(&socket, mark)?;
    }
    socket.connect(target.address()).await?;
    Ok(socket)
}

/// `GET http_path` on `stream`, answered with the expected status.
async fn http_get<S>(stream: &mut S, target: &Target, check: &HealthCheck) -> Result<(), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let host = match (&check.tls_server_name, target.address().ip()) {
        (Some(name), _) => name.clone(),
        (None, IpAddr::V4(a)) => a.to_string(),
        (None, IpAddr::V6(a)) => format!("[{a}]"),
    };
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: vip-agent\r\nConnection: close\r\n\r\n",
        check.http_path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(Failure::Send)?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).await.map_err(Failure::Receive)?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status: Option<u16> = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    match status {
        Some(s) if s == check.http_status => Ok(()),
        Some(got) => Err(Failure::Status {
            path: check.http_path.clone(),
            got,
            want: check.http_status,
        }),
        None => Err(Failure::NoStatusLine),
    }
}

async fn attempt(target: &Target, check: &HealthCheck) -> Result<(), Failure> {
    match check.kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => tcp_connect(target)
            .await
            .map(drop)
            .map_err(Failure::Connect),
        CheckKind::Http => {
            let mut stream = tcp_connect(target).await.map_err(Failure::Connect)?;
            http_get(&mut stream, target, check).await
        }
        CheckKind::Https => {
            let stream = tcp_connect(target).await.map_err(Failure::Connect)?;
            let name = match &check.tls_server_name {
                Some(name) => ServerName::try_from(name.clone())
                    .map_err(|_| Failure::ServerName(name.clone()))?,
                None => ServerName::IpAddress(target.address().ip().into()),
            };
            let mut stream = super::tls::tls_connector()
                .connect(name, stream)
                .await
                .map_err(Failure::Tls)?;
            http_get(&mut stream, target, check).await
        }
        CheckKind::Udp => {
            let socket = udp_connect(target).await.map_err(Failure::Connect)?;
            socket
                .send(check.udp_send.as_bytes())
                .await
                .map_err(Failure::Send)?;
            let mut buf = [0u8; 1500];
            let n = socket.recv(&mut buf).await.map_err(Failure::Receive)?;
            if String::from_utf8_lossy(&buf[..n]).contains(&check.udp_expect) {
                Ok(())
            } else {
                Err(Failure::UnexpectedReply(check.udp_expect.clone()))
            }
        }
    }
}

/// One check, bounded by its timeout.
pub(crate) async fn probe(target: &Target, check: &HealthCheck) -> Result<(), ProbeError> {
    let result = match tokio::time::timeout(check.timeout, attempt(target, check)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout(check.timeout)),
    };
    result.map_err(|failure| ProbeError {
        kind: match check.kind {
            CheckKind::None => "no check",
            CheckKind::Tcp => "TCP",
            CheckKind::Http => "HTTP",
            CheckKind::Https => "HTTPS",
            CheckKind::Udp => "UDP",
        },
        target: target.to_string(),
        failure,
    })
}
