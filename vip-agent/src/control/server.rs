//! The agent's side of the control socket. Reads are answered from the runtime's published
//! view (never waiting for a change in progress); drains go to the runtime as commands.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};
use tracing::{debug, warn};

use super::protocol::{
    AgentStatus, ControlError, DrainTarget, EgressBlockStatus, MAX_MESSAGE, PeerStatus, Request,
    Response,
};
use crate::{bgp::Sessions, dataplane::Counters, view::View};

/// A request only the runtime can answer: it changes what the node does.
#[derive(Debug)]
pub struct Command {
    pub drain: bool,
    pub target: DrainTarget,
    pub reply: oneshot::Sender<Response>,
}

/// The listening socket; removed when dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Listens on `path` (mode 0600; its directory is made 0700 if missing). A socket file
    /// left by an agent that died is replaced; one that a running agent answers on is not.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let bind_err = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.exists()) {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(bind_err)?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Serves until the task is dropped.
    pub async fn serve(
        self,
        view: watch::Receiver<View>,
        sessions: Sessions,
        counters: Arc<Counters>,
        sync: Option<crate::sync::Counters>,
        commands: mpsc::Sender<Command>,
    ) {
        let agent = Arc::new(Agent {
            view,
            sessions,
            counters,
            sync,
            commands,
        });
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "control socket accept");
                    continue;
                }
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &agent).await {
                    debug!(error = %crate::errors::chain(&e), "control connection");
                }
            });
        }
    }
}

/// What requests are answered from: the runtime's view, the BGP sessions, the datapath's and
/// flow-state sharing's counters, and the runtime's command queue.
struct Agent {
    view: watch::Receiver<View>,
    sessions: Sessions,
    counters: Arc<Counters>,
    sync: Option<crate::sync::Counters>,
    commands: mpsc::Sender<Command>,
}

/// Whether the peer may talk to the agent: root, or the agent's own user.
fn authorised(stream: &UnixStream) -> bool {
    // SAFETY: geteuid cannot fail and has no side effects.
    let own = unsafe { libc::geteuid() };
    stream
        .peer_cred()
        .is_ok_and(|cred| cred.uid() == 0 || cred.uid() == own)
}

async fn answer(stream: UnixStream, agent: &Agent) -> Result<(), ControlError> {
    let authorised = authorised(&stream);
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    BufReader::new(read.take(MAX_MESSAGE as u64 + 1))
        .read_until(b'\n', &mut line)
        .await?;
    let response = if !authorised {
        Response::Refused("only root or the agent's user may use the control socket".into())
    } else if line.len() > MAX_MESSAGE {
        Response::Refused(format!("a request longer than {MAX_MESSAGE} bytes"))
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::Refused(format!("not a request: {e}")),
            Ok(request) => respond(request, agent).await,
        }
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

async fn respond(request: Request, agent: &Agent) -> Response {
    let Agent {
        view,
        sessions,
        counters,
        sync,
        commands,
    } = agent;
    let (drain, target) = match request {
        Request::Backends => return Response::Backends(view.borrow().backends.clone()),
        Request::Status => {
            let v = view.borrow().clone();
            return Response::Status(AgentStatus {
                sync: sync.as_ref().map(crate::sync::Counters::snapshot),
                egress: v
                    .egress
                    .iter()
                    .map(|b| EgressBlockStatus {
                        traffic: b
                            .backend_id
                            .and_then(|id| counters.backend_traffic(id).ok())
                            .map(|t| (t.packets, t.bytes)),
                        block: b.clone(),
                    })
                    .collect(),
                ready: v.ready,
                attached: v.attached,
                node_drained: v.node_drained,
                reloads_ok: v.reloads_ok,
                reloads_failed: v.reloads_failed,
                peers: {
                    let bfd = sessions.bfd();
                    sessions
                        .status()
                        .into_iter()
                        .map(|(peer, s)| PeerStatus {
                            peer,
                            state: format!("{:?}", s.state),
                            announced: s.announced,
                            not_carried: s.unsendable,
                            last_error: s.last_error,
                            bfd: bfd
                                .iter()
                                .find(|(p, _)| *p == peer)
                                .map(|(_, b)| (*b).into()),
                        })
                        .collect()
                },
            });
        }
        Request::Drain(target) => (true, target),
        Request::Undrain(target) => (false, target),
    };
    let (reply, answer) = oneshot::channel();
    let command = Command {
        drain,
        target,
        reply,
    };
    if commands.send(command).await.is_err() {
        return Response::Refused("the agent is stopping".into());
    }
    answer
        .await
        .unwrap_or_else(|_| Response::Refused("the agent is stopping".into()))
}
