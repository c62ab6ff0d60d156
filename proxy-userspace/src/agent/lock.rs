//! One agent per network namespace, and one per pin directory.
//!
//! The namespace lock is a listening socket in the abstract unix namespace,
//! which is per network namespace and vanishes when its owner dies, so a
//! crashed agent never leaves a stale lock. A second agent connects to it
//! to learn the owner's pid for the error message. The pin directory (bpffs
//! is shared by all namespaces) is locked with `flock`.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

const ABSTRACT_NAME: &[u8] = b"tcpgate-agent";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another tcpgate agent is already running in this network namespace{}", pid_note(*.pid))]
    NamespaceTaken { pid: Option<i32> },
    #[error("cannot take the agent lock")]
    Io(#[source] std::io::Error),
    #[error(
        "pin directory {0} is in use by another tcpgate agent (another namespace?); give each agent its own agent.pin_dir"
    )]
    PinDirTaken(PathBuf),
    #[error(transparent)]
    NotBpffs(#[from] crate::bpf::NotBpffs),
    #[error("cannot create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn pid_note(pid: Option<i32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// The namespace lock, held for the agent's lifetime.
pub struct NamespaceLock {
    _listener: UnixListener,
}

/// The pin directory lock, held while the agent's maps are pinned there.
pub struct PinDirLock {
    _lock: Flock<File>,
}

impl PinDirLock {
    /// Creates the directory if missing and locks it. Called with the
    /// namespace lock held, so a holder in this namespace is an agent that
    /// is exiting (its files close one by one): that one gets
    /// [`EXIT_WAIT`] to let go.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let since = Instant::now();
        loop {
            match lock_dir(dir) {
                Err(LockError::PinDirTaken(_)) if since.elapsed() < EXIT_WAIT => {
                    std::thread::sleep(RETRY);
                }
                locked => return locked.map(|lock| Self { _lock: lock }),
            }
        }
    }
}

/// How long a lock held by an exiting agent may take to be released: a
/// successor whose takeover failed because its predecessor was killed sees
/// the takeover connection close before the dying agent's other files do.
const EXIT_WAIT: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(10);

/// `PF_EXITING` in `/proc/<pid>/stat`'s flags: the task is in `do_exit`.
const PF_EXITING: u64 = 0x4;

/// Whether `pid` is exiting, or gone (its files are closing or closed).
fn exiting(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The command name, in parentheses, may hold spaces: fields count from
    // the last ')'. After it: state, ppid, pgrp, session, tty, tpgid, flags.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("");
    let flags = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    matches!(state, "Z" | "X" | "x") || flags & PF_EXITING != 0
}

impl NamespaceLock {
    /// Fails if another agent runs in this network namespace. An agent
    /// that is exiting, or a holder that does not answer, gets
    /// [`EXIT_WAIT`] to let go of it.
    pub fn acquire() -> Result<Self, LockError> {
        let addr = SocketAddr::from_abstract_name(ABSTRACT_NAME).map_err(LockError::Io)?;
        let since = Instant::now();
        loop {
            match UnixListener::bind_addr(&addr) {
                Ok(listener) => {
                    return Ok(Self {
                        _listener: listener,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    let pid = UnixStream::connect_addr(&addr)
                        .ok()
                        .and_then(|s| getsockopt(&s.as_fd(), PeerCredentials).ok())
                        .map(|cred| cred.pid());
                    // No pid: the holder would not answer (a listener
                    // being torn down by its dying owner refuses before its
                    // name is free). Only a live holder fails at once.
                    let alive = pid.is_some_and(|pid| !exiting(pid));
                    if since.elapsed() >= EXIT_WAIT || alive {
                        return Err(LockError::NamespaceTaken { pid });
                    }
                    // Each look is a connection the holder never accepts,
                    // queued in its backlog: look less often without a pid.
                    std::thread::sleep(if pid.is_some() { RETRY } else { RETRY * 5 });
                }
                Err(e) => return Err(LockError::Io(e)),
            }
        }
    }
}

/// Both locks, held together: a takeover hands them to the successor.
pub struct Locks {
    _namespace: NamespaceLock,
    _pin_dir: Option<PinDirLock>,
}

/// The agent's locks, released on a takeover (so the successor can take
/// them) and taken back if the successor fails before it holds them.
#[derive(Clone)]
pub struct LockSlot {
    held: std::sync::Arc<std::sync::Mutex<Option<Locks>>>,
    /// The pin directory when the agent locks one.
    pin_dir: Option<PathBuf>,
}

impl LockSlot {
    pub fn new(namespace: NamespaceLock, pin_dir: Option<(PinDirLock, PathBuf)>) -> Self {
        let (lock, dir) = pin_dir.unzip();
        Self {
            held: std::sync::Arc::new(std::sync::Mutex::new(Some(Locks {
                _namespace: namespace,
                _pin_dir: lock,
            }))),
            pin_dir: dir,
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Locks>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lets a successor take both locks.
    pub fn release(&self) {
        self.held().take();
    }

    /// Takes the locks back after a successor gave up.
    pub fn reacquire(&self) -> Result<(), LockError> {
        let namespace = NamespaceLock::acquire()?;
        let pin_dir = self
            .pin_dir
            .as_deref()
            .map(PinDirLock::acquire)
            .transpose()?;
        *self.held() = Some(Locks {
            _namespace: namespace,
            _pin_dir: pin_dir,
        });
        Ok(())
    }
}

fn lock_dir(dir: &Path) -> Result<Flock<File>, LockError> {
    crate::bpf::check_bpffs(dir)?;
    std::fs::create_dir_all(dir).map_err(|source| LockError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    let file = File::open(dir).map_err(|source| LockError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            LockError::PinDirTaken(dir.to_owned())
        } else {
            LockError::PinDir {
                path: dir.to_owned(),
                source: errno.into(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::exiting;

    #[test]
    fn a_running_process_is_not_exiting_and_a_gone_one_is() {
        let me = i32::try_from(std::process::id()).expect("pid");
        assert!(!exiting(me));
        // Above the kernel's pid_max limit (4,194,304): never a process.
        assert!(exiting(i32::MAX));
    }
}
