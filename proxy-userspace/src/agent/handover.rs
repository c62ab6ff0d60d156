//! The agent's side of a takeover: wait for a successor while serving,
//! take over a predecessor's grants, and drain once taken over.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use super::StartupError;
use super::takeover::{self, Handover, Outcome, Predecessor};
use crate::cluster::record::GrantRecord;
use crate::config::Config;
use crate::datapath::DatapathKind;
use crate::gate::Gate;
use crate::session::Services;

/// The takeover socket's server, running until a successor took over.
pub struct Successor {
    task: Option<JoinHandle<Outcome>>,
}

impl Successor {
    /// Binds `agent.takeover_socket` and serves it. Without the socket the
    /// agent still runs; it just cannot be taken over.
    pub fn wait(config: &Config, handover: Handover) -> Self {
        match takeover::listen(&config.agent.takeover_socket) {
            Ok(waiting) => Self {
                task: Some(tokio::spawn(waiting.serve(handover))),
            },
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "this agent cannot be taken over (tcpgate run --takeover); a restart will end its sessions");
                Self { task: None }
            }
        }
    }

    /// Resolves once a successor accepts on this agent's listeners.
    pub async fn taken(&mut self) -> Outcome {
        if let Some(task) = &mut self.task
            && let Ok(outcome) = task.await
        {
            self.task = None;
            return outcome;
        }
        self.task = None;
        std::future::pending().await
    }
}

/// Set by `tcpgate run --supervise` in its agents' environment (its pid):
/// such an agent leaves starting successors to the supervisor.
pub const SUPERVISOR_ENV: &str = "TCPGATE_SUPERVISOR_PID";

/// The notify key a supervised agent sends once a successor took its
/// listeners: from then on it serves nothing new, so should the successor
/// die before it is ready, no agent serves and the supervisor must stop
/// the service (and systemd restart it) rather than wait for the drain.
pub const TAKEN_OVER_KEY: &str = "X_TCPGATE_TAKEN_OVER";

/// The successor this agent started on SIGUSR2 (0: none), which it hands
/// the systemd unit to once taken over.
static SPAWNED: AtomicU32 = AtomicU32::new(0);

/// SIGUSR2: starts this agent's successor: the binary at the path this one
/// was started from (so a build installed there since is what runs), with
/// this agent's arguments plus `--takeover`, in its cgroup and sandbox.
/// The child is reaped (and its failure logged) while this agent runs.
pub fn spawn_successor() {
    // Under `run --supervise` the supervisor starts successors: one started
    // here would not be its child, and it would stop the service once this
    // agent drained.
    if let Some(supervisor) = std::env::var_os(SUPERVISOR_ENV) {
        tracing::warn!(
            supervisor = %supervisor.to_string_lossy(),
            "SIGUSR2 ignored: this agent is supervised; send it to the supervisor (systemctl reload tcpgate)"
        );
        return;
    }
    let mut args = std::env::args_os();
    let Some(program) = args.next() else {
        return;
    };
    let mut rest: Vec<std::ffi::OsString> = args.collect();
    if !rest.iter().any(|a| a == "--takeover") {
        rest.push("--takeover".into());
    }
    let spawned = tokio::process::Command::new(&program)
        .args(&rest)
        .stdin(std::process::Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            let pid = child.id().unwrap_or(0);
            SPAWNED.store(pid, Ordering::Release);
            tracing::info!(pid, program = %program.to_string_lossy(), "SIGUSR2: started a successor");
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(status) if status.success() => {}
                    Ok(status) => tracing::warn!(pid, %status, "the successor exited"),
                    Err(e) => tracing::warn!(pid, error = %e, "cannot wait for the successor"),
                }
            });
        }
        Err(e) => {
            tracing::error!(program = %program.to_string_lossy(), error = %e, "SIGUSR2: cannot start a successor")
        }
    }
}

/// Tells the predecessor this agent accepts now, so it stops, and adopts
/// its live user-space sessions when both the state versions and the data
/// paths allow (else they drain there).
pub async fn taken(
    predecessor: Option<Predecessor>,
    services: &Arc<Services>,
    tasks: &TaskTracker,
) {
    let Some(predecessor) = predecessor else {
        return;
    };
    let pid = predecessor.pid;
    let adopt = predecessor.compatible() && services.datapath.kind() == DatapathKind::Userspace;
    if predecessor.compatible() && !adopt {
        tracing::info!("this agent is on the eBPF data path: the old agent's sessions drain there");
    }
    let clock = std::time::Instant::now();
    let runtime = tokio::runtime::Handle::current();
    let (services_, tasks_) = (Arc::clone(services), tasks.clone());
    let on_batch = move |batch: Vec<takeover::Received>| {
        let _context = runtime.enter();
        for received in batch {
            if let Some(session) = takeover::adopt(Arc::clone(&services_), received) {
                tasks_.spawn_on(session, &runtime);
            }
        }
    };
    let done = tokio::task::spawn_blocking(move || predecessor.taken(adopt, on_batch)).await;
    match done {
        Ok(Ok((link, adopted))) => {
            tracing::info!(
                predecessor = pid,
                adopted,
                took_ms = clock.elapsed().as_millis(),
                "took over: sessions adopted; the old agent drains the rest"
            );
            if let Some(gate) = &services.gate {
                takeover::forward_revocations(link, gate, pid);
            }
        }
        Ok(Err(e)) => tracing::error!(
            predecessor = pid,
            error = %crate::error_chain(&e),
            "the takeover did not finish; the old agent keeps what it did not hand over"
        ),
        Err(e) => tracing::error!(predecessor = pid, error = %e, "the takeover task failed"),
    }
    if std::env::var(takeover::STALL_ENV).is_ok_and(|v| v == "ready") {
        tracing::warn!(
            "{}=ready: never reporting ready after the takeover (test hook)",
            takeover::STALL_ENV
        );
        std::future::pending::<()>().await;
    }
}

/// Installs the predecessor's live source grants.
pub fn install_grants(gate: &Gate, records: &[GrantRecord]) {
    let mut installed = 0usize;
    for record in records {
        match gate.install(record.clone().into_grant()) {
            Ok(true) => installed += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(grant = %record.id, error = %crate::error_chain(&e), "cannot take over a grant");
            }
        }
    }
    tracing::info!(
        grants = installed,
        offered = records.len(),
        "took over the grants"
    );
}

/// After a takeover: hands the live sessions over when the successor
/// adopts them; those left go on here until they end, or their grants
/// expire or are revoked (the gate's timers still run here, and the
/// successor's revocations come over the takeover connection). SIGTERM or
/// SIGINT then ends the drain as a normal stop would, after `grace`.
pub async fn drain(
    services: &Arc<Services>,
    outcome: Outcome,
    grace: Duration,
    timeout: Duration,
) -> Result<(), StartupError> {
    let successor = outcome.successor;
    let link = takeover::hand_over_sessions(services, outcome.link, outcome.adopt, timeout).await;
    if let Some(link) = link {
        takeover::follow_revocations(link, services.gate.clone(), successor);
    }
    let live = services.registry.len();
    tracing::info!(
        successor,
        live,
        "taken over: no new connections here; live sessions drain until they end"
    );
    // systemd follows the successor this agent started (it is in the
    // unit's cgroup); one started by hand is not the unit's.
    let main_pid = if SPAWNED.load(Ordering::Acquire) == successor {
        format!("MAINPID={successor}\n")
    } else {
        String::new()
    };
    let supervised = if std::env::var_os(SUPERVISOR_ENV).is_some() {
        format!("{TAKEN_OVER_KEY}={successor}\n")
    } else {
        String::new()
    };
    crate::notify::status(&format!(
        "{main_pid}{supervised}STATUS=taken over by pid {successor}; draining {live} sessions"
    ));
    let mut term = signal(SignalKind::terminate()).map_err(StartupError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartupError::Signals)?;
    tokio::select! {
        () = services.registry.wait_empty() => {}
        _ = term.recv() => super::drain(services, grace).await,
        _ = int.recv() => super::drain(services, grace).await,
    }
    tracing::info!("drained");
    Ok(())
}
