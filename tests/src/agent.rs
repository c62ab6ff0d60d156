//! `Agent`: the real `tcpgate` agent binary running inside a namespace, with
//! its config, logs, audit file and bpffs pin directory owned by the guard.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use tempfile::TempDir;

use crate::audit::{AuditError, read_audit, wait_for_audit};
use crate::bpffs::PinDir;
use crate::netns::{Netns, NetnsError};
use crate::notify::{NotifyError, NotifyListener};
use crate::process::{ChildGuard, ProcessError, tail};

/// Env var naming the agent binary; default `<workspace>/target/debug/tcpgate`.
pub const BIN_ENV: &str = "TCPGATE_BIN";
/// Default bound on waiting for the agent's `READY=1`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of agent stderr quoted in errors.
const TAIL_LINES: usize = 40;
const NOTIFY_SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "tcpgate binary not found at {} (from {origin}); run `cargo xtask build` first, \
         or set {BIN_ENV} to the binary", path.display()
    )]
    BinaryMissing { path: PathBuf, origin: String },
    #[error("cannot create the agent's temporary directory")]
    TempDir(#[source] std::io::Error),
    #[error("cannot write agent config {path}")]
    ConfigWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Notify(#[from] NotifyError),
    #[error(
        "agent exited before READY=1 ({status}); statuses: {statuses:?}; stderr tail:\n{stderr_tail}"
    )]
    ExitedEarly {
        status: ExitStatus,
        statuses: Vec<String>,
        stderr_tail: String,
    },
    #[error(
        "agent not READY=1 within {timeout:?}; statuses: {statuses:?}; stderr tail:\n{stderr_tail}"
    )]
    NotReady {
        timeout: Duration,
        statuses: Vec<String>,
        stderr_tail: String,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("{waited}; stderr tail:\n{stderr_tail}")]
    LogNotSeen {
        #[source]
        waited: crate::NotWithin,
        stderr_tail: String,
    },
}

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The agent binary: `$TCPGATE_BIN`, else `<workspace>/target/debug/tcpgate`.
pub fn agent_binary() -> Result<PathBuf, AgentError> {
    binary_from(std::env::var_os(BIN_ENV), &workspace_root())
}

/// [`agent_binary`] with its inputs passed in (an empty env value counts as
/// unset). The path must be an existing file.
pub fn binary_from(
    env_value: Option<OsString>,
    workspace_root: &Path,
) -> Result<PathBuf, AgentError> {
    let (path, origin) = match env_value.filter(|value| !value.is_empty()) {
        Some(value) => (PathBuf::from(value), format!("${BIN_ENV}")),
        None => (
            workspace_root.join("target/debug/tcpgate"),
            "the workspace's debug build".to_owned(),
        ),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(AgentError::BinaryMissing { path, origin })
    }
}

/// The agent's files: a temp dir (config, logs, audit) and a bpffs pin dir
/// that is removed on drop if the agent left it behind.
#[derive(Debug)]
struct AgentFiles {
    dir: TempDir,
    pins: PinDir,
}

impl AgentFiles {
    fn new() -> Result<AgentFiles, AgentError> {
        let dir = tempfile::Builder::new()
            .prefix("tg-agent-")
            .tempdir()
            .map_err(AgentError::TempDir)?;
        Ok(AgentFiles {
            dir,
            pins: PinDir::new(),
        })
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("tcpgate.toml")
    }

    fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }
}

/// Configures and starts an [`Agent`] in a namespace. Get the paths to put
/// into the config ([`AgentBuilder::audit_path`], [`AgentBuilder::pin_dir`])
/// before setting it.
#[derive(Debug)]
pub struct AgentBuilder<'a> {
    netns: &'a Netns,
    files: AgentFiles,
    config: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    binary: Option<PathBuf>,
    ready_timeout: Duration,
}

impl<'a> AgentBuilder<'a> {
    pub fn new(netns: &'a Netns) -> Result<AgentBuilder<'a>, AgentError> {
        Ok(AgentBuilder {
            netns,
            files: AgentFiles::new()?,
            config: String::new(),
            args: Vec::new(),
            envs: Vec::new(),
            binary: None,
            ready_timeout: READY_TIMEOUT,
        })
    }

    /// The agent's temporary directory (config, stdout/stderr, audit).
    pub fn dir(&self) -> &Path {
        self.files.dir.path()
    }

    /// Where the config is written: `<dir>/tcpgate.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.files.config_path()
    }

    /// A fresh audit file path for `[audit] path = "..."`.
    pub fn audit_path(&self) -> PathBuf {
        self.files.audit_path()
    }

    /// A unique, not yet existing directory under /sys/fs/bpf for
    /// `[agent] pin_dir = "..."`; removed on drop if still present.
    pub fn pin_dir(&self) -> &Path {
        self.files.pins.path()
    }

    /// The TOML config text, written to [`AgentBuilder::config_path`].
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = toml.into();
        self
    }

    /// An extra argument after `run --config <file>`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs this binary instead of [`agent_binary`].
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Writes the config text to [`AgentBuilder::config_path`] (done by
    /// `spawn` too).
    pub fn write_config(&self) -> Result<PathBuf, AgentError> {
        let path = self.config_path();
        std::fs::write(&path, &self.config).map_err(|source| AgentError::ConfigWrite {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    fn resolve_binary(&self) -> Result<PathBuf, AgentError> {
        match &self.binary {
            Some(path) => binary_from(Some(path.clone().into_os_string()), &workspace_root()),
            None => agent_binary(),
        }
    }

    /// Starts `<bin> run --config <file> <args...>` in the namespace and
    /// waits (bounded) for `READY=1`. The agent enters only the network
    /// namespace and keeps the host's mounts, so its bpffs pins are the
    /// host's (`ip netns exec` would hide /sys/fs/bpf).
    pub fn spawn(self) -> Result<Agent, AgentError> {
        let binary = self.resolve_binary()?;
        let config_path = self.write_config()?;
        let notify = NotifyListener::new()?;
        let mut command = self.netns.command_keep_mounts(&binary)?;
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(&self.args)
            .env("NOTIFY_SOCKET", notify.path())
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        let mut child = ChildGuard::spawn_logged(&mut command, self.files.dir.path(), "agent")?;
        child.set_term_grace(STOP_GRACE);
        wait_ready(&mut child, &notify, self.ready_timeout)?;
        Ok(Agent {
            child,
            notify,
            binary,
            config_path,
            files: self.files,
        })
    }
}

fn wait_ready(
    child: &mut ChildGuard,
    notify: &NotifyListener,
    timeout: Duration,
) -> Result<(), AgentError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            // Collect what it managed to say before dying.
            notify.poll()?;
            return Err(AgentError::ExitedEarly {
                status,
                statuses: notify.statuses(),
                stderr_tail: child.stderr_tail(TAIL_LINES),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(AgentError::NotReady {
                timeout,
                statuses: notify.statuses(),
                stderr_tail: child.stderr_tail(TAIL_LINES),
            });
        }
        match notify.wait_for("READY=1", NOTIFY_SLICE.min(deadline - now)) {
            Ok(()) => return Ok(()),
            Err(NotifyError::Timeout { .. }) => {}
            Err(err) => return Err(err.into()),
        }
    }
}

/// A running agent. Dropping it sends SIGTERM, waits up to [`STOP_GRACE`],
/// SIGKILLs if needed, then removes its pin dir and temp dir.
#[derive(Debug)]
pub struct Agent {
    // Drop order matters: the process goes first, then its files.
    child: ChildGuard,
    notify: NotifyListener,
    binary: PathBuf,
    config_path: PathBuf,
    files: AgentFiles,
}

impl Agent {
    pub fn builder(netns: &Netns) -> Result<AgentBuilder<'_>, AgentError> {
        AgentBuilder::new(netns)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// A command running the same binary as an operator CLI (e.g.
    /// `sessions`), in the host's namespaces: pinned maps are global.
    pub fn cli_command(&self) -> Command {
        Command::new(&self.binary)
    }

    pub fn dir(&self) -> &Path {
        self.files.dir.path()
    }

    pub fn audit_path(&self) -> PathBuf {
        self.files.audit_path()
    }

    pub fn pin_dir(&self) -> &Path {
        self.files.pins.path()
    }

    /// The notify socket, e.g. to wait for `STOPPING=1` or `RELOADING=1`.
    pub fn notify(&self) -> &NotifyListener {
        &self.notify
    }

    /// Everything the agent wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.child.stderr()
    }

    pub fn stdout(&self) -> String {
        self.child.stdout()
    }

    pub fn logs_tail(&self, lines: usize) -> String {
        tail(&self.logs(), lines)
    }

    /// Waits at most `timeout` until the agent's stderr contains `needle`
    /// (a reload applied, say).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<(), AgentError> {
        crate::eventually(timeout, &format!("agent log line {needle:?}"), || {
            self.logs().contains(needle)
        })
        .map_err(|waited| AgentError::LogNotSeen {
            waited,
            stderr_tail: self.logs_tail(10),
        })
    }

    pub fn signal(&mut self, signal: Signal) -> Result<(), AgentError> {
        Ok(self.child.signal(signal)?)
    }

    /// Waits at most `timeout` for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, AgentError> {
        Ok(self.child.wait_timeout(timeout)?)
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus, AgentError> {
        Ok(self.child.terminate()?)
    }

    /// The audit file's complete JSON lines (none if it does not exist yet).
    /// A last line without its newline is still being written and skipped.
    pub fn audit_events(&self) -> Result<Vec<Value>, AgentError> {
        Ok(read_audit(&self.audit_path())?)
    }

    /// Polls the audit file until an event matches `pred`, for at most
    /// `timeout`; returns that event.
    pub fn wait_for_audit(
        &self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        Ok(wait_for_audit(&self.audit_path(), pred, timeout)?)
    }
}
