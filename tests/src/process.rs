//! `ChildGuard`: a child process that is terminated and reaped on drop, with
//! its output going to log files the test can read.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd;

/// How long `Drop` waits after SIGTERM before sending SIGKILL.
pub const DEFAULT_TERM_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Waited(#[from] crate::NotWithin),
    #[error("could not start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create log file {path}")]
    LogFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for process {pid} ({name}) failed")]
    Wait {
        pid: u32,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} ({name}) has already exited ({status}); not signalling a reaped pid")]
    AlreadyExited {
        pid: u32,
        name: String,
        status: ExitStatus,
    },
    #[error("sending {signal} to process {pid} ({name}) failed")]
    Signal {
        pid: u32,
        name: String,
        signal: Signal,
        #[source]
        source: nix::Error,
    },
}

/// Owns a running child. Drop sends SIGTERM, waits up to the grace period,
/// then SIGKILLs, and always reaps. Never panics.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
    stdout_path: Option<PathBuf>,
    stderr_path: Option<PathBuf>,
    exit: Option<ExitStatus>,
    term_grace: Duration,
}

impl ChildGuard {
    /// Takes ownership of an already spawned child.
    pub fn new(child: Child, name: impl Into<String>) -> ChildGuard {
        ChildGuard {
            child,
            name: name.into(),
            stdout_path: None,
            stderr_path: None,
            exit: None,
            term_grace: DEFAULT_TERM_GRACE,
        }
    }

    /// Spawns `command` with stdin from /dev/null and stdout/stderr going to
    /// `<log_dir>/<name>.stdout` and `<log_dir>/<name>.stderr`.
    pub fn spawn_logged(
        command: &mut Command,
        log_dir: &Path,
        name: &str,
    ) -> Result<ChildGuard, ProcessError> {
        let stdout_path = log_dir.join(format!("{name}.stdout"));
        let stderr_path = log_dir.join(format!("{name}.stderr"));
        let create = |path: &Path| {
            File::create(path).map_err(|source| ProcessError::LogFile {
                path: path.to_owned(),
                source,
            })
        };
        let stdout = create(&stdout_path)?;
        let stderr = create(&stderr_path)?;
        command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let child = spawn_retrying_busy(command).map_err(|source| ProcessError::Spawn {
            command: cmd::describe(command),
            source,
        })?;
        let mut guard = ChildGuard::new(child, name);
        guard.stdout_path = Some(stdout_path);
        guard.stderr_path = Some(stderr_path);
        Ok(guard)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The underlying child, e.g. to take a piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// How long `Drop` waits after SIGTERM before SIGKILL.
    pub fn set_term_grace(&mut self, grace: Duration) {
        self.term_grace = grace;
    }

    /// The exit status if the child has exited (reaping it), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(|source| ProcessError::Wait {
                pid: self.child.id(),
                name: self.name.clone(),
                source,
            })?;
        }
        Ok(self.exit)
    }

    /// Waits at most `timeout` for the child to exit; `None` if it is still
    /// running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        match crate::eventually(timeout, "exit", || self.try_wait()) {
            Ok(status) => Ok(Some(status)),
            Err(ProcessError::Waited(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends `signal` to the child. Refuses once the child has been reaped,
    /// because its pid may belong to another process by then.
    pub fn signal(&mut self, signal: Signal) -> Result<(), ProcessError> {
        if let Some(status) = self.try_wait()? {
            return Err(ProcessError::AlreadyExited {
                pid: self.child.id(),
                name: self.name.clone(),
                status,
            });
        }
        let pid = self.child.id();
        let raw = i32::try_from(pid).unwrap_or(i32::MAX);
        kill(Pid::from_raw(raw), signal).map_err(|source| ProcessError::Signal {
            pid,
            name: self.name.clone(),
            signal,
            source,
        })
    }

    pub fn stdout_path(&self) -> Option<&Path> {
        self.stdout_path.as_deref()
    }

    pub fn stderr_path(&self) -> Option<&Path> {
        self.stderr_path.as_deref()
    }

    /// Everything the child wrote to stdout so far ("" when not logged).
    pub fn stdout(&self) -> String {
        read_lossy(self.stdout_path.as_deref())
    }

    /// Everything the child wrote to stderr so far ("" when not logged).
    pub fn stderr(&self) -> String {
        read_lossy(self.stderr_path.as_deref())
    }

    /// The last `lines` lines of stderr, for error messages.
    pub fn stderr_tail(&self, lines: usize) -> String {
        tail(&self.stderr(), lines)
    }

    /// SIGTERM, wait up to the grace period, SIGKILL, reap. Returns the exit
    /// status once reaped.
    pub fn terminate(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if let Some(status) = self.signal_unless_exited(Signal::SIGTERM)? {
            return Ok(status);
        }
        if let Some(status) = self.wait_timeout(self.term_grace)? {
            return Ok(status);
        }
        eprintln!(
            "tcpgate-tests: {} (pid {}) ignored SIGTERM for {:?}; sending SIGKILL",
            self.name,
            self.pid(),
            self.term_grace
        );
        if let Some(status) = self.signal_unless_exited(Signal::SIGKILL)? {
            return Ok(status);
        }
        let status = self.child.wait().map_err(|source| ProcessError::Wait {
            pid: self.child.id(),
            name: self.name.clone(),
            source,
        })?;
        self.exit = Some(status);
        Ok(status)
    }
}

impl ChildGuard {
    /// Signals the child, or returns its status if it has already exited.
    fn signal_unless_exited(&mut self, signal: Signal) -> Result<Option<ExitStatus>, ProcessError> {
        match self.signal(signal) {
            Ok(()) => Ok(None),
            Err(ProcessError::AlreadyExited { status, .. }) => Ok(Some(status)),
            Err(err) => Err(err),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(err) = self.terminate() {
            eprintln!("tcpgate-tests: stopping {}: {err}", self.name);
            // Last resort so nothing is left running: kill and reap.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawns `command`, retrying a few times on ETXTBSY: a script a test has
/// just written can be briefly "busy" because another thread forked while
/// the file was open for writing (the fd lives in that child until exec).
fn spawn_retrying_busy(command: &mut Command) -> io::Result<Child> {
    let mut attempts = 0;
    loop {
        match command.spawn() {
            Err(err) if err.raw_os_error() == Some(libc::ETXTBSY) && attempts < 20 => {
                attempts += 1;
                thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

fn read_lossy(path: Option<&Path>) -> String {
    path.and_then(|path| std::fs::read(path).ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
