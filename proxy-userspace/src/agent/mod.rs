//! The agent: choose the data path, listen, serve sessions, and shut down
//! cleanly on SIGTERM.

mod lock;
mod startup;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditLog, AuditTarget};
use crate::config::{Config, Forward};
use crate::session::{self, Admitted, Services, Target};

pub use lock::LockError;
pub use startup::StartupError;

/// How long sessions still running after the grace period get to finish
/// their teardown.
const TEARDOWN_BOUND: Duration = Duration::from_secs(5);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartupError> {
    let started = startup::start(&config).await?;
    let audit = AuditLog::open(&AuditTarget::parse(&config.audit.path)).await?;
    let services = Arc::new(Services {
        datapath: started.datapath.clone(),
        audit: audit.clone(),
        registry: crate::registry::Registry::new(config.agent.max_sessions as usize),
        connect_timeout: config.agent.connect_timeout,
        upstream_mark: None,
    });

    let mut listeners = Vec::new();
    for forward in &config.forwards {
        let listener =
            TcpListener::bind(forward.listen)
                .await
                .map_err(|source| StartupError::Listen {
                    addr: forward.listen,
                    source,
                })?;
        listeners.push((listener, Arc::new(forward.clone())));
    }
    let (stop_accepting, accepting) = watch::channel(false);
    let tasks = TaskTracker::new();
    for (listener, forward) in listeners {
        tracing::info!(listen = %forward.listen, upstream = %forward.upstream, "forwarding");
        tasks.spawn(accept_forward(
            listener,
            forward,
            Arc::clone(&services),
            accepting.clone(),
            tasks.clone(),
        ));
    }
    let datapath = services.datapath.kind().as_str();
    tracing::info!(
        datapath,
        forwards = config.forwards.len(),
        "tcpgate agent ready"
    );
    crate::notify::ready(&format!("serving on the {datapath} data path"));

    wait_for_termination().await?;
    crate::notify::status("STOPPING=1\nSTATUS=draining sessions");
    let _ = stop_accepting.send(true);
    let grace = config.agent.shutdown_grace;
    let live = services.registry.len();
    tracing::info!(
        live,
        ?grace,
        "stopping: no new connections; waiting for sessions to end"
    );
    if tokio::time::timeout(grace, services.registry.wait_empty())
        .await
        .is_err()
    {
        let ended = services
            .registry
            .stop_where(crate::datapath::EndReason::AgentShutdown, |_| true);
        tracing::info!(
            sessions = ended,
            "grace period over; ending remaining sessions"
        );
        if tokio::time::timeout(TEARDOWN_BOUND, services.registry.wait_empty())
            .await
            .is_err()
        {
            tracing::error!(
                left = services.registry.len(),
                "sessions did not finish teardown in time"
            );
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(TEARDOWN_BOUND, tasks.wait()).await;
    audit.flush().await;
    started.cleanup();
    tracing::info!("tcpgate agent stopped");
    Ok(())
}

async fn wait_for_termination() -> Result<(), StartupError> {
    let mut term = signal(SignalKind::terminate()).map_err(StartupError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartupError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartupError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: static forwards are fixed at startup; restart the agent to change them");
            }
        }
    }
}

async fn accept_forward(
    listener: TcpListener,
    forward: Arc<Forward>,
    services: Arc<Services>,
    mut stop: watch::Receiver<bool>,
    tasks: TaskTracker,
) {
    let target = Target {
        destination: forward.listen,
        upstream: forward.upstream,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let services = Arc::clone(&services);
                    let target = target.clone();
                    tasks.spawn(session::serve(services, client, peer, target, Admitted::unauthenticated()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listen = %forward.listen, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}
