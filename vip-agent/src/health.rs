//! Backend health checks: one task per (VIP, backend), concurrent, each bounded by its timeout
//! so a slow or hung backend never delays the others, and spread over the interval so a
//! restart does not check every backend at the same instant.
//!
//! A backend goes down after `fall` failures in a row and comes back after `rise` successes.
//! Flapping is damped: a backend that comes back and goes down again within ten intervals
//! needs twice as many successes the next time (up to 16 × `rise`); ten quiet intervals reset it.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};

use crate::{
    balancer::BackendKey,
    config::{CheckKind, Config, HealthCheck},
};

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
    tasks: HashMap<BackendKey, (HealthCheck, JoinHandle<()>)>,
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
    /// restarts changed ones (their state starts afresh: up).
    pub fn sync(&mut self, config: &Config) {
        let mut wanted: HashMap<BackendKey, HealthCheck> = HashMap::new();
        for vip in &config.vips {
            for b in &vip.backends {
                if b.health.kind != CheckKind::None {
                    wanted.insert((vip.key(), b.address), b.health.clone());
                }
            }
        }
        self.tasks.retain(|key, (check, task)| {
            let keep = wanted.get(key) == Some(check);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut reports = self.reports.lock().expect("reports lock");
        reports.retain(|key, _| self.tasks.contains_key(key) || wanted.contains_key(key));
        for (key, check) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            reports.insert(key, Report::default());
            let task = tokio::spawn(run(
                key,
                check.clone(),
                self.events.clone(),
                self.reports.clone(),
            ));
            self.tasks.insert(key, (check, task));
        }
    }

    /// The latest result of every checked backend.
    pub fn reports(&self) -> HashMap<BackendKey, Report> {
        self.reports.lock().expect("reports lock").clone()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
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

async fn run(key: BackendKey, check: HealthCheck, events: mpsc::Sender<Event>, reports: Reports) {
    let target = SocketAddr::new(key.1, check.port);
    let mut up = true;
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut flaps = 0u32;
    let mut last_change = Instant::now();
    let mut next = Instant::now() + offset(&key, check.interval);
    loop {
        tokio::time::sleep_until(next).await;
        next += check.interval;
        let started = Instant::now();
        let result = match timeout(check.timeout, probe(target, &check)).await {
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
            Ok(()) => format!("ok in {latency:.1?}"),
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

/// One check.
async fn probe(target: SocketAddr, check: &HealthCheck) -> Result<(), String> {
    match check.kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => TcpStream::connect(target)
            .await
            .map(drop)
            .map_err(|e| format!("TCP {target}: {e}")),
        CheckKind::Http => {
            let mut stream = TcpStream::connect(target)
                .await
                .map_err(|e| format!("HTTP {target}: {e}"))?;
            let host = match target.ip() {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            let request = format!(
                "GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: vip-agent\r\nConnection: close\r\n\r\n",
                check.http_path
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("HTTP {target}: {e}"))?;
            let mut head = [0u8; 64];
            let n = stream
                .read(&mut head)
                .await
                .map_err(|e| format!("HTTP {target}: {e}"))?;
            let line = String::from_utf8_lossy(&head[..n]);
            let status: Option<u16> = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            match status {
                Some(s) if s == check.http_status => Ok(()),
                Some(s) => Err(format!(
                    "HTTP {target}{}: status {s}, want {}",
                    check.http_path, check.http_status
                )),
                None => Err(format!("HTTP {target}: no status line")),
            }
        }
        CheckKind::Udp => {
            let bind: SocketAddr = if target.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(bind)
                .await
                .map_err(|e| format!("UDP: {e}"))?;
            socket
                .connect(target)
                .await
                .map_err(|e| format!("UDP {target}: {e}"))?;
            socket
                .send(check.udp_send.as_bytes())
                .await
                .map_err(|e| format!("UDP {target}: {e}"))?;
            let mut buf = [0u8; 1500];
            let n = socket
                .recv(&mut buf)
                .await
                .map_err(|e| format!("UDP {target}: {e}"))?;
            if String::from_utf8_lossy(&buf[..n]).contains(&check.udp_expect) {
                Ok(())
            } else {
                Err(format!("UDP {target}: reply lacks {:?}", check.udp_expect))
            }
        }
    }
}
