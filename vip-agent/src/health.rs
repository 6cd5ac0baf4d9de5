//! Backend health checks: one task per (VIP, backend), concurrent, each bounded by its timeout
//! so a slow or hung backend never delays the others, and spread over the interval so a
//! restart does not check every backend at the same instant.
//!
//! A check goes to the backend's own address, or (`via = "datapath"`) to the VIP from the node's
//! own address, marked so that the datapath's `vip_hc` program carries it to the backend
//! encapsulated like client traffic; the backend answers directly, as it answers clients.
//!
//! A backend goes down after `fall` failures in a row and comes back after `rise` successes.
//! Flapping is damped: a backend that comes back and goes down again within ten intervals
//! needs twice as many successes the next time (up to 16 × `rise`); ten quiet intervals reset it.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};

use tokio_rustls::TlsConnector;
use vip_common::{BackendId, HEALTH_CHECK_MARK};

use crate::{
    balancer::BackendKey,
    config::{CheckKind, CheckVia, Config, HealthCheck},
};

/// Where a check's packets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
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

fn unspecified(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Marks every packet of a socket (SO_MARK; needs CAP_NET_ADMIN).
fn set_mark(socket: &impl AsRawFd, mark: u32) -> std::io::Result<()> {
    crate::sockopt::set(socket, libc::SOL_SOCKET, libc::SO_MARK, &mark)
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

/// A backend changed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub key: BackendKey,
    pub up: bool,
    pub reason: String,
}

/// The latest about one backend, for `status` and the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub up: bool,
    pub last_ok: bool,
    pub last_detail: String,
    pub latency: Duration,
    pub changes: u64,
}

impl Default for Report {
    fn default() -> Self {
        Self {
            up: true,
            last_ok: true,
            last_detail: "not checked yet".into(),
            latency: Duration::ZERO,
            changes: 0,
        }
    }
}

type Reports = Arc<Mutex<HashMap<BackendKey, Report>>>;

/// Runs the checks of every backend that has one.
pub struct Checker {
    tasks: HashMap<BackendKey, (HealthCheck, Target, JoinHandle<()>)>,
    events: mpsc::Sender<Event>,
    reports: Reports,
}

impl Checker {
    pub fn new() -> (Self, mpsc::Receiver<Event>) {
        let (events, rx) = mpsc::channel(1024);
        (
            Self {
                tasks: HashMap::new(),
                events,
                reports: Arc::default(),
            },
            rx,
        )
    }

    /// Makes the running checks those of `config`: starts new ones, stops removed ones,
    /// restarts changed ones (their state starts afresh: up). `ids`: the backends' ids in the
    /// datapath, which data-path checks carry in their mark.
    pub fn sync(&mut self, config: &Config, ids: impl Fn(&BackendKey) -> Option<BackendId>) {
        let mut wanted: HashMap<BackendKey, (HealthCheck, Target)> = HashMap::new();
        for vip in &config.vips {
            for b in &vip.backends {
                if b.health.kind == CheckKind::None {
                    continue;
                }
                let key = (vip.key(), b.address);
                let target = match b.health.via {
                    CheckVia::Direct => Target::Direct(SocketAddr::new(b.address, b.health.port)),
                    CheckVia::Datapath => {
                        // Validation made sure the node has a source of the VIP's family.
                        let source = match vip.address {
                            IpAddr::V4(_) => config.node.source_v4.map(IpAddr::V4),
                            IpAddr::V6(_) => config.node.source_v6.map(IpAddr::V6),
                        };
                        let (Some(source), Some(id)) = (source, ids(&key)) else {
                            tracing::warn!(vip = %vip.address, backend = %b.address, "no data-path check: no source address or backend id");
                            continue;
                        };
                        Target::Datapath {
                            vip: SocketAddr::new(vip.address, b.health.port),
                            source,
                            mark: HEALTH_CHECK_MARK | id,
                        }
                    }
                };
                wanted.insert(key, (b.health.clone(), target));
            }
        }
        self.tasks.retain(|key, (check, target, task)| {
            let keep = wanted.get(key) == Some(&(check.clone(), *target));
            if !keep {
                task.abort();
            }
            keep
        });
        let mut reports = self.reports.lock().expect("reports lock");
        reports.retain(|key, _| self.tasks.contains_key(key) || wanted.contains_key(key));
        for (key, (check, target)) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            reports.insert(key, Report::default());
            let task = tokio::spawn(run(
                key,
                check.clone(),
                target,
                self.events.clone(),
                self.reports.clone(),
            ));
            self.tasks.insert(key, (check, target, task));
        }
    }

    /// The latest result of every checked backend.
    pub fn reports(&self) -> HashMap<BackendKey, Report> {
        self.reports.lock().expect("reports lock").clone()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, _, task) in self.tasks.values() {
            task.abort();
        }
    }
}

/// Where in the interval a backend's checks fall: fixed per backend, spread over all of them.
fn offset(key: &BackendKey, interval: Duration) -> Duration {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    interval.mul_f64((h.finish() % 1000) as f64 / 1000.0)
}

async fn run(
    key: BackendKey,
    check: HealthCheck,
    target: Target,
    events: mpsc::Sender<Event>,
    reports: Reports,
) {
    let mut up = true;
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut flaps = 0u32;
    let mut last_change = Instant::now();
    let mut next = Instant::now() + offset(&key, check.interval);
    loop {
        tokio::time::sleep_until(next).await;
        next += check.interval;
        let started = Instant::now();
        let result = match timeout(check.timeout, probe(&target, &check)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", check.timeout)),
        };
        let latency = started.elapsed();
        let ok = result.is_ok();
        if ok {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        if last_change.elapsed() > check.interval * 10 {
            flaps = 0;
        }
        let needed = check.rise << flaps.min(4);
        let change = if up && failures >= check.fall {
            Some(false)
        } else if !up && successes >= needed {
            Some(true)
        } else {
            None
        };
        let detail = match &result {
            Ok(()) => match target {
                Target::Direct(_) => format!("ok in {latency:.1?}"),
                Target::Datapath { .. } => format!("ok in {latency:.1?} through the data path"),
            },
            Err(e) => e.clone(),
        };
        {
            let mut reports = reports.lock().expect("reports lock");
            let r = reports.entry(key).or_default();
            r.last_ok = ok;
            r.last_detail = detail.clone();
            r.latency = latency;
            if let Some(new) = change {
                r.up = new;
                r.changes += 1;
            }
        }
        if let Some(new) = change {
            if !new && last_change.elapsed() < check.interval * 10 {
                flaps += 1;
            }
            up = new;
            last_change = Instant::now();
            let reason = if new {
                format!("{successes} checks in a row passed ({detail})")
            } else {
                format!("{failures} checks in a row failed: {detail}")
            };
            if events.send(Event { key, up, reason }).await.is_err() {
                return;
            }
        }
        // A check that overran keeps to the schedule instead of piling up.
        if next < Instant::now() {
            next = Instant::now() + check.interval;
            sleep(Duration::ZERO).await;
        }
    }
}

/// `GET http_path` on `stream`, answered with the expected status. The error starts where the
/// caller's "HTTP target" prefix ends.
async fn http_get<S>(stream: &mut S, target: &Target, check: &HealthCheck) -> Result<(), String>
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
        .map_err(|e| format!(": {e}"))?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).await.map_err(|e| format!(": {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status: Option<u16> = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    match status {
        Some(s) if s == check.http_status => Ok(()),
        Some(s) => Err(format!(
            "{}: status {s}, want {}",
            check.http_path, check.http_status
        )),
        None => Err(": no status line".into()),
    }
}

/// TLS for HTTPS checks: a real handshake (signatures checked), but any certificate: backends
/// are addressed by IP and commonly carry certificates for service names or none we could
/// trust, and the check is about the service answering, not about its identity.
fn tls_connector() -> TlsConnector {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Arc::new(config)
    });
    TlsConnector::from(config.clone())
}

/// Accepts any server certificate; checks the handshake's signatures like any verifier.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One check.
async fn probe(target: &Target, check: &HealthCheck) -> Result<(), String> {
    let to = match target {
        Target::Direct(a) => a.to_string(),
        Target::Datapath { vip, .. } => format!("{vip} through the data path"),
    };
    match check.kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => tcp_connect(target)
            .await
            .map(drop)
            .map_err(|e| format!("TCP {to}: {e}")),
        CheckKind::Http => {
            let mut stream = tcp_connect(target)
                .await
                .map_err(|e| format!("HTTP {to}: {e}"))?;
            http_get(&mut stream, target, check)
                .await
                .map_err(|e| format!("HTTP {to}{e}"))
        }
        CheckKind::Https => {
            let stream = tcp_connect(target)
                .await
                .map_err(|e| format!("HTTPS {to}: {e}"))?;
            let name = match &check.tls_server_name {
                // Validated with the config.
                Some(name) => ServerName::try_from(name.clone())
                    .map_err(|e| format!("HTTPS {to}: server name: {e}"))?,
                None => ServerName::IpAddress(target.address().ip().into()),
            };
            let mut stream = tls_connector()
                .connect(name, stream)
                .await
                .map_err(|e| format!("HTTPS {to}: TLS: {e}"))?;
            http_get(&mut stream, target, check)
                .await
                .map_err(|e| format!("HTTPS {to}{e}"))
        }
        CheckKind::Udp => {
            let socket = udp_connect(target)
                .await
                .map_err(|e| format!("UDP {to}: {e}"))?;
            socket
                .send(check.udp_send.as_bytes())
                .await
                .map_err(|e| format!("UDP {to}: {e}"))?;
            let mut buf = [0u8; 1500];
            let n = socket
                .recv(&mut buf)
                .await
                .map_err(|e| format!("UDP {to}: {e}"))?;
            if String::from_utf8_lossy(&buf[..n]).contains(&check.udp_expect) {
                Ok(())
            } else {
                Err(format!("UDP {to}: reply lacks {:?}", check.udp_expect))
            }
        }
    }
}
