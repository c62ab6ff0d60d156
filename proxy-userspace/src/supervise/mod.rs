//! `tcpgate run --supervise`: a small parent that stays systemd's main
//! process for the service's whole life and runs the serving agent as its
//! child.
//!
//! Why: a successor an agent starts itself (SIGUSR2 without a supervisor)
//! is not systemd's child, and systemd 252 SIGKILLs such a main process
//! right after SIGTERM on `systemctl stop`, cutting its drain. With the
//! supervisor, every agent is the supervisor's child and the supervisor is
//! the main process throughout:
//!
//! - SIGUSR2: starts a successor, `<argv[0]> run ... --takeover` (argv[0]
//!   is the installed path, so a build installed since is what runs); the
//!   serving child hands over and drains. A successor that exits before it
//!   is ready leaves the old agent serving (logged, and in the unit's
//!   status);
//! - SIGHUP: forwarded to the serving child (a plain config reload);
//! - SIGTERM, SIGINT: forwarded to every child; the supervisor exits once
//!   they all did (after their drain), with the serving agent's status;
//! - the children's sd_notify messages come to the supervisor's own socket
//!   ([`inbox`]), which relays the serving agent's (never `MAINPID=`), so
//!   the unit keeps `NotifyAccess=main`.
//!
//! One current-thread runtime; each child's exit is a task, not a thread.

mod children;
mod inbox;

use std::ffi::OsString;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::ExitStatus;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;

use children::{Children, Exited};
use inbox::Inbox;

/// The flag that makes `tcpgate run` a supervisor; its children run
/// without it.
pub const FLAG: &str = "--supervise";
const TAKEOVER: &str = "--takeover";

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot bind the supervisor's notify socket")]
    Inbox(#[source] std::io::Error),
    #[error("cannot start the agent {}", .program.to_string_lossy())]
    Spawn {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the supervisor with this process's own command line (minus
/// [`FLAG`]) as the agents' command line. Returns the exit status.
pub fn run() -> i32 {
    let mut argv = std::env::args_os();
    let program = argv.next().unwrap_or_else(|| "tcpgate".into());
    let args: Vec<OsString> = argv.filter(|a| a != FLAG).collect();
    let supervised = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SuperviseError::Runtime)
        .and_then(|runtime| runtime.block_on(supervise(program, args)));
    match supervised {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "supervisor failed");
            eprintln!("tcpgate: {}", crate::error_chain(&e));
            1
        }
    }
}

struct Supervisor {
    program: OsString,
    args: Vec<OsString>,
    inbox: Inbox,
    children: Children,
    exits: JoinSet<(u32, std::io::Result<ExitStatus>)>,
    stopping: bool,
    /// The status the supervisor exits with: the last serving agent's.
    code: i32,
}

async fn supervise(program: OsString, args: Vec<OsString>) -> Result<i32, SuperviseError> {
    // Before any child can report ready.
    let mut term = signal(SignalKind::terminate()).map_err(SuperviseError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SuperviseError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(SuperviseError::Signals)?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(SuperviseError::Signals)?;
    let mut sv = Supervisor {
        program,
        args,
        inbox: Inbox::bind().map_err(SuperviseError::Inbox)?,
        children: Children::default(),
        exits: JoinSet::new(),
        stopping: false,
        code: 0,
    };
    let first = sv.spawn(false)?;
    tracing::info!(pid = first, "supervisor: started the agent");
    loop {
        tokio::select! {
            _ = term.recv() => sv.stop(Signal::SIGTERM),
            _ = int.recv() => sv.stop(Signal::SIGINT),
            _ = hup.recv() => sv.forward_hup(),
            _ = usr2.recv() => sv.take_over(),
            received = sv.inbox.recv() => match received {
                Ok(received) => sv.relay(received.pid, received.message),
                Err(e) => tracing::warn!(error = %e, "supervisor: notify socket read failed"),
            },
            Some(joined) = sv.exits.join_next() => {
                if let Ok((pid, status)) = joined {
                    sv.exited(pid, status);
                }
                if sv.children.is_empty() {
                    return Ok(sv.code);
                }
            }
        }
    }
}

impl Supervisor {
    /// Starts an agent (a successor with `--takeover`).
    fn spawn(&mut self, takeover: bool) -> Result<u32, SuperviseError> {
        let mut command = tokio::process::Command::new(&self.program);
        command.args(&self.args);
        if takeover && !self.args.iter().any(|a| a == TAKEOVER) {
            command.arg(TAKEOVER);
        }
        command
            .env("NOTIFY_SOCKET", self.inbox.address())
            .env(crate::agent::SUPERVISOR_ENV, std::process::id().to_string())
            .stdin(std::process::Stdio::null());
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of
        // this process; the closure runs in the child between fork and exec.
        // Should the supervisor die (SIGKILL), its agents stop cleanly
        // rather than run on unsupervised.
        unsafe {
            command.as_std_mut().pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawn_error = |source| SuperviseError::Spawn {
            program: self.program.clone(),
            source,
        };
        let mut child = command.spawn().map_err(spawn_error)?;
        let pid = child.id().unwrap_or_default();
        self.exits.spawn(async move { (pid, child.wait().await) });
        self.children.started(pid);
        Ok(pid)
    }

    fn take_over(&mut self) {
        if self.stopping {
            return;
        }
        let Some(serving) = self.children.serving() else {
            tracing::warn!("SIGUSR2: no agent serves yet; not starting a successor");
            return;
        };
        if let Some(starting) = self.children.starting() {
            tracing::warn!(
                successor = starting,
                "SIGUSR2: a takeover is already under way"
            );
            return;
        }
        // Before the successor exists: whoever sees it (`cargo xtask
        // install`) sees the unit reloading too.
        crate::notify::status(&format!(
            "RELOADING=1\nSTATUS=starting a successor to take over from pid {serving}"
        ));
        match self.spawn(true) {
            Ok(pid) => {
                tracing::info!(serving, successor = pid, program = %self.program.to_string_lossy(), "SIGUSR2: started a successor to take over");
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), serving, "takeover failed; the old agent keeps serving");
                crate::notify::status(&format!(
                    "READY=1\nSTATUS=takeover failed: cannot start the successor; pid {serving} still serving"
                ));
            }
        }
    }

    fn forward_hup(&self) {
        match self.children.serving() {
            Some(pid) => send(pid, Signal::SIGHUP),
            None => tracing::warn!("SIGHUP: no agent serves yet; ignored"),
        }
    }

    fn stop(&mut self, signal: Signal) {
        self.stopping = true;
        let pids = self.children.pids();
        tracing::info!(?signal, agents = ?pids, "supervisor: stopping the agents");
        for pid in pids {
            send(pid, signal);
        }
    }

    fn relay(&mut self, pid: Option<u32>, message: Option<String>) {
        let (Some(pid), Some(message)) = (pid, message) else {
            return;
        };
        if self.children.role(pid).is_none() {
            tracing::debug!(
                pid,
                "notify message from a process that is not one of the supervisor's agents; ignored"
            );
            return;
        }
        if let Some(relayed) = self.children.notified(pid, &message) {
            crate::notify::status(&relayed);
        }
    }

    fn exited(&mut self, pid: u32, status: std::io::Result<ExitStatus>) {
        let code = match &status {
            Ok(status) => exit_code(*status),
            Err(e) => {
                tracing::error!(pid, error = %e, "cannot wait for an agent");
                1
            }
        };
        match self.children.exited(pid) {
            Exited::TakeoverFailed { serving } => {
                tracing::error!(
                    successor = pid,
                    code,
                    serving,
                    "takeover failed: the successor exited before it was ready; the old agent keeps serving"
                );
                crate::notify::status(&format!(
                    "READY=1\nSTATUS=takeover failed: successor pid {pid} exited with status {code}; pid {serving} still serving"
                ));
            }
            Exited::HandedOff => {
                tracing::info!(pid, code, "the old agent exited; its successor is starting");
            }
            Exited::Drained if code == 0 => {
                tracing::info!(pid, "a taken-over agent drained and exited")
            }
            Exited::Drained => tracing::warn!(pid, code, "a taken-over agent exited with an error"),
            Exited::NoneServing => {
                // An agent ending on its own is a failure even with status
                // 0, so that `Restart=on-failure` brings the service back.
                self.code = if self.stopping || code != 0 { code } else { 1 };
                if !self.stopping {
                    tracing::error!(
                        pid,
                        code,
                        "no agent serves any more (the serving agent, or a successor that had taken over, exited); stopping the service"
                    );
                    crate::notify::status(&format!(
                        "STATUS=pid {pid} exited with status {code} and no agent serves; stopping (systemd restarts the service)"
                    ));
                    self.stop(Signal::SIGTERM);
                }
            }
        }
    }
}

fn send(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if let Err(e) = kill(Pid::from_raw(raw), signal) {
        tracing::warn!(pid, ?signal, error = %e, "cannot signal an agent");
    }
}

/// The shell's convention: the exit code, or 128 plus the signal number.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}
