//! One agent per network namespace, and one per pin directory.
//!
//! Both locks are `flock`s on files in the agent's runtime directory
//! (`$RUNTIME_DIRECTORY`, as systemd's `RuntimeDirectory=` sets it, else
//! /run/tcpgate), which only root or the agent's account may write: no
//! other local user can take either lock first and keep the agent from
//! starting (the namespace lock was an abstract unix socket, a name any
//! user could bind). A `flock` goes with its holder's last descriptor, so
//! a crashed agent never leaves a stale lock. The namespace's file is
//! named by the namespace's inode, the pin directory's by its path (bpffs
//! is shared by all namespaces). The older builds' abstract name still
//! counts when a trusted user holds it ([`legacy`]).

mod file;
mod legacy;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use file::{LockFile, Locked, runtime_dir};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another tcpgate agent is already running in this network namespace{}", pid_note(*.pid))]
    NamespaceTaken { pid: Option<i32> },
    #[error("cannot tell which network namespace this is (/proc/self/ns/net)")]
    Namespace(#[source] std::io::Error),
    #[error(
        "pin directory {0} is in use by another tcpgate agent (another namespace?); give each agent its own agent.pin_dir"
    )]
    PinDirTaken(PathBuf),
    #[error(transparent)]
    NotBpffs(#[from] crate::bpf::NotBpffs),
    #[error("cannot create or read {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is {why}: another local user could take the agent's locks or replace its pins; \
         remove it, or let root or the agent's user own it with mode 0755 (0750 for a pin directory)"
    )]
    Untrusted { path: PathBuf, why: String },
    #[error("cannot take the lock {path}")]
    LockFile {
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
    _lock: LockFile,
    /// The older builds' lock name, held for them (see [`legacy`]).
    _legacy: Option<std::os::unix::net::UnixListener>,
}

/// The pin directory lock, held while the agent's maps are pinned there.
pub struct PinDirLock {
    _lock: LockFile,
}

impl PinDirLock {
    /// Creates the directory if missing (mode 0750) and locks it. Called
    /// with the namespace lock held, so a holder in this namespace is an
    /// agent that is exiting (its files close one by one): that one gets
    /// [`EXIT_WAIT`] to let go.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        crate::bpf::check_bpffs(dir)?;
        file::trusted_dir(dir, 0o750)?;
        let key = std::fs::canonicalize(dir).map_err(|source| LockError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let name = file::stable_name("pins", key.as_os_str().as_encoded_bytes());
        match retry(&name, |_| true)? {
            Locked::Held(lock) => Ok(Self { _lock: lock }),
            Locked::Busy { .. } => Err(LockError::PinDirTaken(dir.to_owned())),
        }
    }
}

/// Locks `name` in the runtime directory, trying again for [`EXIT_WAIT`]
/// while `wait(holder pid)` says its holder may be letting go; `Busy`
/// names the holder that kept it.
fn retry(name: &str, wait: impl Fn(Option<i32>) -> bool) -> Result<Locked, LockError> {
    let dir = runtime_dir();
    let meta = file::trusted_dir(&dir, 0o755)?;
    let since = Instant::now();
    loop {
        match file::lock(&dir, &meta, name)? {
            Locked::Busy { pid } if since.elapsed() < EXIT_WAIT && wait(pid) => {
                std::thread::sleep(RETRY);
            }
            tried => return Ok(tried),
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
    /// that is exiting, or a holder whose pid /proc does not show, gets
    /// [`EXIT_WAIT`] to let go of it.
    pub fn acquire() -> Result<Self, LockError> {
        let netns = std::fs::metadata("/proc/self/ns/net").map_err(LockError::Namespace)?;
        let name = format!("netns-{}.lock", std::os::unix::fs::MetadataExt::ino(&netns));
        let lock = match retry(&name, |pid| pid.is_none_or(exiting))? {
            Locked::Held(lock) => lock,
            Locked::Busy { pid } => return Err(LockError::NamespaceTaken { pid }),
        };
        if let Some(pid) = legacy::holder() {
            return Err(LockError::NamespaceTaken { pid: Some(pid) });
        }
        // Lock files of killed agents (their namespaces may be gone).
        file::sweep(&runtime_dir());
        Ok(Self {
            _lock: lock,
            _legacy: legacy::bind(),
        })
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
