//! `Netns`: a named network namespace (`ip netns add`) that removes itself,
//! and every process left inside it, when dropped.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::{self, CommandError};

/// Prefix of every namespace name made here.
pub const NAME_PREFIX: &str = "tg";

/// How long `Drop` waits for killed processes to leave the namespace.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// `ip netns add` mounts /run/netns on first use; concurrent first calls can
/// stack that mount, so this process creates namespaces one at a time.
static ADD_LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Waited(#[from] crate::NotWithin),
    #[error("cannot open network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setns into network namespace {name} failed")]
    Setns {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start a thread for network namespace {name}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// A network namespace named `<tag><pid>-<n>`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with `lo` up, named `tg<tag><pid>-<n>`.
    /// `tag` is a short hint (shortened to keep names ≤ 15 chars); the `tg`
    /// prefix marks every namespace the toolkit makes, for leak checks.
    pub fn new(tag: &str) -> Result<Netns, NetnsError> {
        let name = Self::add(tag)?;
        // From here on the guard owns the namespace, so `?` cleans it up.
        let ns = Netns { name };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn add(tag: &str) -> Result<String, NetnsError> {
        let _serialized = ADD_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut attempt = 0;
        loop {
            let name = crate::unique_name(&format!("{NAME_PREFIX}{tag}"));
            match cmd::run("ip", ["netns", "add", name.as_str()]) {
                Ok(_) => return Ok(name),
                // A leftover from an earlier run with the same pid: take the next name.
                Err(CommandError::Failed { ref stderr, .. })
                    if stderr.contains("File exists") && attempt < 5 =>
                {
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: the bind mount that keeps the namespace alive.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn open(&self) -> Result<File, NetnsError> {
        let path = self.path();
        File::open(&path).map_err(|source| NetnsError::Open { path, source })
    }

    /// Runs `f` on a fresh thread that has entered this namespace, so every
    /// socket `f` creates belongs to it. Sockets keep their namespace, so a
    /// listener bound here may be moved to and used from any thread.
    /// A panic in `f` is propagated.
    ///
    /// # Panics
    /// If the thread cannot enter the namespace (see [`Netns::try_run`]).
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        self.try_run(f).unwrap_or_else(|err| panic!("{err}"))
    }

    /// Like [`Netns::run`], but reports failing to enter the namespace.
    pub fn try_run<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("ns-{}", self.name))
                .spawn_scoped(scope, move || {
                    setns(&file, CloneFlags::CLONE_NEWNET)?;
                    drop(file);
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread {
                    name: self.name.clone(),
                    source,
                })?;
            match handle.join() {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(source)) => Err(NetnsError::Setns {
                    name: self.name.clone(),
                    source,
                }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts a long-running thread inside this namespace (a server, say).
    /// Returns once the thread has entered the namespace, so a failure to
    /// enter is reported here rather than at `join`.
    pub fn spawn_thread<F, R>(&self, f: F) -> Result<NsThread<R>, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let (entered_tx, entered_rx) = mpsc::sync_channel(1);
        let handle = thread::Builder::new()
            .name(format!("ns-{}", self.name))
            .spawn(move || {
                let entered = setns(&file, CloneFlags::CLONE_NEWNET);
                drop(file);
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                ok.then(f)
            })
            .map_err(|source| NetnsError::Thread {
                name: self.name.clone(),
                source,
            })?;
        let setns_error = |source| NetnsError::Setns {
            name: self.name.clone(),
            source,
        };
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(NsThread { handle }),
            Ok(Err(errno)) => {
                let _ = handle.join();
                Err(setns_error(errno))
            }
            // The thread dropped the sender without sending: it cannot get
            // here without sending first, but report rather than assume.
            Err(_) => Err(setns_error(nix::Error::UnknownErrno)),
        }
    }

    /// `ip netns exec <name> <program>`. Note that `ip netns exec` also
    /// enters a private mount namespace with a fresh /sys, hiding the host's
    /// bpffs (/sys/fs/bpf) and cgroup2 mounts; see
    /// [`Netns::command_keep_mounts`] for programs that need those.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// A command for `program` that enters only this network namespace (via
    /// `setns` between fork and exec) and keeps the host's mounts, so
    /// /sys/fs/bpf pins and /sys/fs/cgroup are the shared ones.
    pub fn command_keep_mounts(&self, program: impl AsRef<OsStr>) -> Result<Command, NetnsError> {
        let file = self.open()?;
        let mut command = Command::new(program);
        let enter = move || -> std::io::Result<()> {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        };
        // SAFETY: `enter` runs in the forked child before exec. It makes one
        // setns(2) syscall and builds an io::Error from errno, both
        // async-signal-safe and allocation-free. The closure owns `file`, so
        // the namespace fd stays open as long as the Command lives; it is
        // O_CLOEXEC, so the program does not inherit it.
        unsafe {
            command.pre_exec(enter);
        }
        Ok(command)
    }

    /// Runs `args[0] args[1..]` inside the namespace (via `ip netns exec`)
    /// and returns its stdout; a failure carries the command and its stderr.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String, NetnsError> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        let output = cmd::run_checked(&mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `ip -n <name> <args...>`, returning stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String, NetnsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("ip");
        command.args(["-n", &self.name]).args(args);
        let output = cmd::run_checked(&mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        self.exec_ok(&["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Pids of the processes whose network namespace this is (`ip netns
    /// pids`), never including this test process itself.
    pub fn pids(&self) -> Result<Vec<Pid>, NetnsError> {
        let out = cmd::run("ip", ["netns", "pids", self.name.as_str()])?;
        let me = std::process::id();
        Ok(out
            .split_whitespace()
            .filter_map(|word| word.parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter_map(|pid| i32::try_from(pid).ok().map(Pid::from_raw))
            .collect())
    }

    fn kill_all(&self) -> Result<(), NetnsError> {
        let mut pids = Vec::new();
        let gone = crate::eventually(KILL_WAIT, "processes killed", || {
            pids = self.pids()?;
            for &pid in &pids {
                // ESRCH just means it is already gone.
                let _ = kill(pid, Signal::SIGKILL);
            }
            Ok::<_, NetnsError>(pids.is_empty())
        });
        match gone {
            Err(NetnsError::Waited(_)) => {
                eprintln!(
                    "tcpgate-tests: processes {pids:?} still in netns {} after SIGKILL",
                    self.name
                );
                Ok(())
            }
            other => other,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = self.kill_all() {
            eprintln!(
                "tcpgate-tests: killing processes in netns {}: {err}",
                self.name
            );
        }
        if let Err(err) = cmd::run("ip", ["netns", "del", self.name.as_str()]) {
            eprintln!("tcpgate-tests: removing netns {}: {err}", self.name);
        }
    }
}

/// A thread started by [`Netns::spawn_thread`].
#[derive(Debug)]
pub struct NsThread<R> {
    handle: JoinHandle<Option<R>>,
}

impl<R> NsThread<R> {
    /// Waits for the thread and returns its result, propagating a panic.
    pub fn join(self) -> R {
        match self.handle.join() {
            Ok(Some(value)) => value,
            // `spawn_thread` only returns an NsThread after the thread
            // entered the namespace, and then it always runs `f`.
            Ok(None) => panic!("namespace thread returned without running its closure"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}
