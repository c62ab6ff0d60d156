//! The agent's side of a takeover: wait for a successor while serving,
//! take over a predecessor's grants, and drain once taken over.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use super::StartupError;
use super::takeover::{self, Handover, Outcome, Predecessor};
use crate::cluster::record::GrantRecord;
use crate::config::Config;
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

/// Tells the predecessor this agent accepts now, so it stops.
pub fn taken(predecessor: Option<Predecessor>) {
    let Some(predecessor) = predecessor else {
        return;
    };
    let pid = predecessor.pid;
    match predecessor.taken() {
        Ok(()) => tracing::info!(
            predecessor = pid,
            "took over: the old agent drains its sessions"
        ),
        Err(e) => tracing::error!(
            predecessor = pid,
            error = %crate::error_chain(&e),
            "cannot tell the old agent it was taken over; it keeps accepting too until stopped"
        ),
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

/// After a takeover: live sessions go on until they end, or their grants
/// expire or are revoked (the gate's timers still run here). SIGTERM or
/// SIGINT then ends the drain as a normal stop would, after `grace`.
pub async fn drain(
    services: &Services,
    outcome: &Outcome,
    grace: Duration,
) -> Result<(), StartupError> {
    let live = services.registry.len();
    tracing::info!(
        successor = outcome.successor,
        live,
        "taken over: no new connections here; live sessions drain until they end"
    );
    crate::notify::status(&format!(
        "STATUS=taken over by pid {}; draining {live} sessions",
        outcome.successor
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
