//! `NotifyListener`: the receiving end of systemd's sd_notify protocol, so a
//! test knows when the agent is READY (and what STATUS it reported).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// sd_notify datagrams are small; systemd itself caps them well below this.
const MAX_DATAGRAM: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot create a temporary directory for the notify socket")]
    TempDir(#[source] io::Error),
    #[error("cannot bind notify socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("receiving from notify socket {path} failed")]
    Recv {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no {wanted:?} on the notify socket within {timeout:?}; statuses seen: {statuses:?}")]
    Timeout {
        wanted: String,
        timeout: Duration,
        statuses: Vec<String>,
    },
}

/// A unix datagram socket at a temporary path; pass [`NotifyListener::path`]
/// as `NOTIFY_SOCKET` to the process under test. The socket and its
/// directory are removed on drop.
#[derive(Debug)]
pub struct NotifyListener {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every assignment received so far (`READY=1`, `STATUS=...`), in order.
    received: Mutex<Vec<String>>,
    _dir: TempDir,
}

impl NotifyListener {
    pub fn new() -> Result<NotifyListener, NotifyError> {
        let dir = tempfile::Builder::new()
            .prefix("tg-notify-")
            .tempdir()
            .map_err(NotifyError::TempDir)?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).map_err(|source| NotifyError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(NotifyListener {
            socket,
            path,
            received: Mutex::new(Vec::new()),
            _dir: dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits at most `timeout` until an assignment equal to `wanted` (e.g.
    /// `"READY=1"`) has been received, now or earlier. Datagrams may carry
    /// several newline-separated assignments.
    pub fn wait_for(&self, wanted: &str, timeout: Duration) -> Result<(), NotifyError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.seen(wanted) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NotifyError::Timeout {
                    wanted: wanted.to_owned(),
                    timeout,
                    statuses: self.statuses(),
                });
            }
            self.receive(Some(deadline - now))?;
        }
    }

    /// Reads whatever datagrams are queued, without blocking.
    pub fn poll(&self) -> Result<(), NotifyError> {
        self.receive(None)
    }

    /// Every assignment received so far, in order.
    pub fn messages(&self) -> Vec<String> {
        self.lock().clone()
    }

    /// The values of the `STATUS=` assignments received so far.
    pub fn statuses(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter_map(|m| m.strip_prefix("STATUS="))
            .map(str::to_owned)
            .collect()
    }

    fn seen(&self, wanted: &str) -> bool {
        self.lock().iter().any(|m| m == wanted)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.received
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Receives datagrams: with `Some(timeout)`, blocks up to that long for
    /// the first; with `None` only takes what is queued. Drains everything
    /// else already queued either way.
    fn receive(&self, timeout: Option<Duration>) -> Result<(), NotifyError> {
        let recv_error = |source| NotifyError::Recv {
            path: self.path.clone(),
            source,
        };
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut blocking = timeout;
        loop {
            let result = match blocking.take() {
                // A zero read timeout means "block forever": clamp it.
                Some(t) => {
                    self.socket
                        .set_read_timeout(Some(t.max(Duration::from_millis(1))))
                        .map_err(recv_error)?;
                    self.socket.set_nonblocking(false).map_err(recv_error)?;
                    self.socket.recv(&mut buf)
                }
                None => {
                    self.socket.set_nonblocking(true).map_err(recv_error)?;
                    self.socket.recv(&mut buf)
                }
            };
            match result {
                Ok(len) => self.record(&buf[..len]),
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(());
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(recv_error(err)),
            }
        }
    }

    fn record(&self, datagram: &[u8]) {
        let text = String::from_utf8_lossy(datagram);
        let mut received = self.lock();
        received.extend(
            text.split('\n')
                .map(str::trim_end)
                .filter(|line| !line.is_empty())
                .map(str::to_owned),
        );
    }
}
