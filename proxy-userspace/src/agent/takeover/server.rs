//! The running agent's side: wait for a successor on the takeover socket,
//! offer the listeners and state, release the locks, and learn when the
//! successor accepts.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;

use super::{
    HandedState, ListenerSet, Message, STALL_ENV, STATE_VERSION, TakeoverError, set_timeouts,
    unexpected, wire,
};
use crate::agent::lock::LockSlot;
use crate::api::SocketFile;
use crate::cluster::record::GrantRecord;
use crate::gate::Gate;
use crate::intercept::RoutingParams;

/// What the running agent hands to a successor.
pub struct Handover {
    pub listeners: ListenerSet,
    pub locks: LockSlot,
    pub gate: Option<Arc<Gate>>,
    /// `[cluster] name`, stamped on the grant records.
    pub bastion: String,
    pub routing: Option<RoutingParams>,
    pub timeout: Duration,
    /// The pin directory when eBPF is loaded: its pins move aside for the
    /// successor's (see [`crate::drain_pins`]).
    pub pin_dir: Option<std::path::PathBuf>,
}

/// A successor took over.
#[derive(Debug)]
pub struct Outcome {
    pub successor: u32,
    /// The successor adopts live sessions (it waits for them).
    pub adopt: bool,
    /// The takeover connection, kept open while this agent drains.
    pub link: UnixStream,
}

/// Why one takeover attempt failed, and whether the locks were let go.
struct Failed {
    error: TakeoverError,
    released: bool,
}

/// The takeover socket, bound and waiting.
pub struct Waiting {
    listener: UnixListener,
    /// Removes the socket file when this agent is done with it.
    _file: SocketFile,
}

/// Binds the takeover socket at `path` (before the agent reports ready,
/// so a successor started after that finds it).
pub fn listen(path: &Path) -> Result<Waiting, TakeoverError> {
    let (listener, file) = bind(path)?;
    tracing::info!(socket = %path.display(), "waiting for a successor (tcpgate run --takeover)");
    Ok(Waiting {
        listener,
        _file: file,
    })
}

impl Waiting {
    /// Serves until a successor has taken over. Attempts that fail (a peer
    /// that is not root or this agent's user, or in another network
    /// namespace; a successor that dies or stalls) are logged and the
    /// agent goes on serving.
    pub async fn serve(self, handover: Handover) -> Outcome {
        let handover = Arc::new(handover);
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "takeover accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(stream) = authorized(stream) else {
                continue;
            };
            let shared = Arc::clone(&handover);
            match tokio::task::spawn_blocking(move || {
                handshake(&stream, &shared).map(|(successor, adopt)| Outcome {
                    successor,
                    adopt,
                    link: stream,
                })
            })
            .await
            {
                Ok(Ok(outcome)) => return outcome,
                Ok(Err(failed)) => give_up(&handover, failed),
                Err(e) => tracing::error!(error = %e, "takeover task failed"),
            }
        }
    }
}

/// Root, or the user this agent runs as (the systemd unit's), only.
fn authorized(stream: tokio::net::UnixStream) -> Option<UnixStream> {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a takeover peer's credentials; closing");
            return None;
        }
    };
    let own = nix::unistd::geteuid().as_raw();
    if uid != 0 && uid != own {
        tracing::warn!(
            uid,
            "refused a takeover request from a user that is neither root nor this agent's"
        );
        return None;
    }
    // Socket paths are shared by every network namespace: an agent of
    // another namespace must not take this one's listeners.
    if let Some(pid) = stream.peer_cred().ok().and_then(|c| c.pid()) {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"));
        let ours = std::fs::read_link("/proc/self/ns/net");
        if let (Ok(theirs), Ok(ours)) = (theirs, ours)
            && theirs != ours
        {
            tracing::warn!(
                pid,
                "refused a takeover request from another network namespace"
            );
            return None;
        }
    }
    let stream = stream.into_std().ok()?;
    stream.set_nonblocking(false).ok()?;
    Some(stream)
}

fn give_up(handover: &Handover, failed: Failed) {
    tracing::warn!(error = %crate::error_chain(&failed.error), "takeover failed; this agent goes on serving");
    if failed.released {
        if let Some(pin_dir) = &handover.pin_dir
            && let Err(e) = crate::drain_pins::move_back(pin_dir, std::process::id())
        {
            tracing::warn!(error = %e, "cannot move the pins back");
        }
        match handover.locks.reacquire() {
            Ok(()) => tracing::info!("locks taken back"),
            Err(e) => tracing::error!(
                error = %crate::error_chain(&e),
                "cannot take the locks back after a failed takeover; restart this agent"
            ),
        }
    }
}

/// Creates the socket, mode 0600, in a directory created 0700 if missing.
/// A stale socket from an agent that is gone is replaced.
fn bind(path: &Path) -> Result<(UnixListener, SocketFile), TakeoverError> {
    let err = |source| TakeoverError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    let file = SocketFile::bound(path);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok((listener, file))
}

/// The successor's pid, and whether it adopts sessions.
fn handshake(stream: &UnixStream, handover: &Handover) -> Result<(u32, bool), Failed> {
    let mut released = false;
    let result = steps(stream, handover, &mut released);
    result.map_err(|error| Failed { error, released })
}

fn steps(
    stream: &UnixStream,
    handover: &Handover,
    released: &mut bool,
) -> Result<(u32, bool), TakeoverError> {
    set_timeouts(stream, handover.timeout).map_err(TakeoverError::Io)?;
    let (hello, _) = wire::recv(stream)?;
    let Message::Hello { state_version, pid } = hello else {
        return Err(unexpected("hello", &hello));
    };
    tracing::info!(
        successor = pid,
        state_version,
        ours = STATE_VERSION,
        "a successor asks to take over"
    );
    let offer = Message::Offer {
        state_version: STATE_VERSION,
        pid: std::process::id(),
        listeners: handover.listeners.infos(),
        state: state(handover),
    };
    wire::send(stream, &offer, &handover.listeners.fds())?;
    if std::env::var(STALL_ENV).is_ok_and(|v| v == "offer") {
        tracing::warn!("{STALL_ENV}=offer: not answering the successor (test hook)");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    match wire::recv(stream)?.0 {
        Message::Take => {}
        other => return Err(unexpected("take", &other)),
    }
    if let Some(pin_dir) = &handover.pin_dir {
        match crate::drain_pins::move_aside(pin_dir, std::process::id()) {
            Ok(dir) => tracing::info!(dir = %dir.display(), "pins moved aside for the successor's"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot move the pins aside; the successor replaces them")
            }
        }
    }
    handover.locks.release();
    *released = true;
    wire::send(stream, &Message::Released, &[])?;
    tracing::info!(
        successor = pid,
        "locks released; waiting for the successor to accept"
    );
    match wire::recv(stream)?.0 {
        // A successor of another state version cannot read our sessions:
        // it does not ask, but check anyway.
        Message::Taken { adopt } => Ok((pid, adopt && state_version == STATE_VERSION)),
        other => Err(unexpected("taken", &other)),
    }
}

fn state(handover: &Handover) -> HandedState {
    let grants = handover.gate.as_ref().map_or_else(Vec::new, |gate| {
        gate.grants()
            .iter()
            .filter_map(|g| GrantRecord::of(g, &handover.bastion))
            .collect()
    });
    HandedState {
        routing: handover.routing,
        grants,
        revocations: handover
            .gate
            .as_ref()
            .map(|gate| gate.revocations())
            .unwrap_or_default(),
    }
}
