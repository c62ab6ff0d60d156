//! The agent: choose the data path, install interception, serve sessions,
//! reload on SIGHUP, and shut down cleanly on SIGTERM.

mod accept;
mod auth;
mod endpoints;
mod lock;
mod startup;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditLog, AuditTarget};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::datapath::EndReason;
use crate::session::{Services, Target};

pub use lock::LockError;
pub use startup::StartupError;
// The pieces `run` wires together, for assembling an agent in-process
// without root (proxy-userspace/tests/gate_session).
pub use accept::{Resolver, accept_loop};
pub use auth::{AuthStartError, start as start_gate};

/// How long sessions still running after the grace period get to finish
/// their teardown.
const TEARDOWN_BOUND: Duration = Duration::from_secs(5);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config, config_path: PathBuf) -> Result<(), StartupError> {
    let mut started = startup::start(&config).await?;
    let cluster = match &config.cluster {
        Some(section) => Some(Arc::new(Cluster::connect(section).await?)),
        None => None,
    };
    let mut metrics = crate::metrics::Metrics::new(started.datapath.kind(), started.take_stats());
    if let Some(cluster) = &cluster {
        cluster.health().register(metrics.registry_mut());
    }
    let (stop_background, background) = watch::channel(false);
    let registry = crate::registry::Registry::new(config.agent.max_sessions as usize);
    let gate = auth::start(&config, &registry, started.take_grant_mirror(), &background).await?;
    if let Some(gate) = &gate {
        gate.register_metrics(metrics.registry_mut());
    }
    let metrics = Arc::new(metrics);
    let audit = AuditLog::open(
        &AuditTarget::parse(&config.audit.path),
        metrics.audit_dropped(),
    )
    .await?
    .with_bastion(cluster.as_ref().map(|c| c.name()));
    // Nothing is admitted or granted before the fleet's revocations and
    // grants are in (listeners already bound keep their SYNs queued).
    let mut proceed = true;
    if let (Some(cluster), Some(gate)) = (&cluster, &gate) {
        tokio::spawn(Arc::clone(cluster).run(Arc::clone(gate), background.clone()));
        proceed = fleet_loaded(cluster).await?;
    }
    let services = Arc::new(Services {
        datapath: started.datapath.clone(),
        audit: audit.clone(),
        registry: Arc::clone(&registry),
        gate: gate.clone(),
        connect_timeout: config.agent.connect_timeout,
        stall_timeout: config.agent.stall_timeout,
        upstream_mark: started
            .interceptor
            .as_ref()
            .map(|_| config.agent.upstream_mark),
        interceptor: started.interceptor.clone(),
        metrics: Arc::clone(&metrics),
    });

    let mut listeners: Vec<(TcpListener, Resolver)> = Vec::new();
    for forward in &config.forwards {
        let listener =
            TcpListener::bind(forward.listen)
                .await
                .map_err(|source| StartupError::Listen {
                    addr: forward.listen,
                    source,
                })?;
        tracing::info!(listen = %forward.listen, upstream = %forward.upstream, "forwarding");
        let target = Target {
            destination: forward.listen,
            upstream: forward.upstream,
        };
        listeners.push((listener, Resolver::Fixed(target)));
    }
    if let Some(interceptor) = started.interceptor.clone() {
        for listener in started.take_intercept_listeners() {
            listeners.push((listener, Resolver::Intercept(Arc::clone(&interceptor))));
        }
        for entry in &interceptor.current().entries {
            tracing::info!(destination = %entry.destination, "intercepting");
        }
    }
    for (listener, _) in &listeners {
        // Accepted sockets inherit the stall bounds (TCP_USER_TIMEOUT,
        // keepalive): set once here instead of on every client socket.
        if let Err(e) =
            crate::sockopt::set_stall_timeout(listener.as_fd(), config.agent.stall_timeout)
        {
            tracing::warn!(error = %e, "cannot bound stalls on a listener's sessions");
        }
    }
    let (stop_accepting, accepting) = watch::channel(false);
    let tasks = TaskTracker::new();
    for (listener, resolver) in listeners {
        tasks.spawn(accept::accept_loop(
            listener,
            resolver,
            Arc::clone(&services),
            accepting.clone(),
            tasks.clone(),
        ));
    }
    let api_state = Arc::new(crate::api::ApiState {
        gate,
        registry: Arc::clone(&registry),
        datapath: services.datapath.clone(),
        ready: std::sync::atomic::AtomicBool::new(false),
        metrics,
        cluster: cluster.clone(),
    });
    let api_tls = endpoints::start(&config, &api_state, &accepting, &background).await?;
    if proceed {
        serve(&config_path, &services, &api_state, api_tls.as_deref()).await?;
    } else {
        tracing::info!("stopping before the fleet's grants were loaded");
    }
    crate::notify::status("STOPPING=1\nSTATUS=draining sessions");
    let _ = stop_accepting.send(true);
    api_state
        .ready
        .store(false, std::sync::atomic::Ordering::Release);
    drain(&services, config.agent.shutdown_grace).await;
    tasks.close();
    let _ = tokio::time::timeout(TEARDOWN_BOUND, tasks.wait()).await;
    audit.flush().await;
    let _ = stop_background.send(true);
    drop(services);
    started.cleanup();
    tracing::info!("tcpgate agent stopped");
    Ok(())
}

/// In a fleet, waits until the fleet's grants and revocations are loaded
/// from etcd, so a restarted bastion admits the fleet's grants (and
/// refuses its revocations) from its first connection. False when a
/// signal to stop came first.
async fn fleet_loaded(cluster: &Cluster) -> Result<bool, StartupError> {
    let mut term = signal(SignalKind::terminate()).map_err(StartupError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartupError::Signals)?;
    tracing::info!("loading the fleet's grants and revocations from etcd before reporting ready");
    crate::notify::status("STATUS=loading the fleet's grants from etcd");
    tokio::select! {
        () = cluster.health().wait_synced() => Ok(true),
        _ = term.recv() => Ok(false),
        _ = int.recv() => Ok(false),
    }
}

/// Reports ready and serves until SIGTERM or SIGINT.
async fn serve(
    config_path: &Path,
    services: &Services,
    api_state: &crate::api::ApiState,
    api_tls: Option<&crate::api::TlsFiles>,
) -> Result<(), StartupError> {
    api_state
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    // Loading the eBPF object parsed the kernel's BTF: megabytes freed.
    crate::heap::release_free_pages();
    let datapath = services.datapath.kind().as_str();
    tracing::info!(datapath, "tcpgate agent ready");
    crate::notify::ready(&format!("serving on the {datapath} data path"));

    wait_for_termination(config_path, services, api_tls).await
}

async fn drain(services: &Services, grace: Duration) {
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
            .stop_where(EndReason::AgentShutdown, |_| true);
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
}

async fn wait_for_termination(
    config_path: &Path,
    services: &Services,
    api_tls: Option<&crate::api::TlsFiles>,
) -> Result<(), StartupError> {
    let mut term = signal(SignalKind::terminate()).map_err(StartupError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartupError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartupError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                reload(config_path, services);
                reload_certificate(api_tls);
            }
        }
    }
}

/// SIGHUP: re-reads the configuration and applies what can change live
/// (the intercepted set). A bad file changes nothing.
fn reload(config_path: &Path, services: &Services) {
    crate::notify::status("RELOADING=1");
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "reload rejected; keeping the running configuration");
            crate::notify::status("READY=1\nSTATUS=reload rejected");
            return;
        }
    };
    match (&services.interceptor, config.intercept.is_some()) {
        (Some(interceptor), true) => {
            interceptor
                .set_interfaces(config.intercept.as_ref().and_then(|i| i.interfaces.clone()));
            match interceptor.apply(config.intercept_set.clone(), &services.registry.snapshot()) {
                Ok(report) => tracing::info!(
                    prefixes = report.prefixes,
                    protected = report.protected,
                    sessions_pinned = report.sessions_pinned,
                    "reloaded the intercepted set"
                ),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "reload of the intercepted set failed")
                }
            }
        }
        (None, true) | (Some(_), false) => {
            tracing::warn!(
                "turning interception on or off needs a restart; intercepted set unchanged"
            );
        }
        (None, false) => {
            tracing::info!("reload: nothing to apply live (forwards change on restart)")
        }
    }
    reload_policy(&config, services);
    crate::notify::status("READY=1\nSTATUS=serving");
}

/// SIGHUP: a renewed API certificate (same paths) serves new connections.
fn reload_certificate(api_tls: Option<&crate::api::TlsFiles>) {
    if let Some(tls) = api_tls {
        match tls.reload() {
            Ok(()) => tracing::info!("reloaded the grant API's certificate"),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot reload the grant API's certificate; keeping the running one")
            }
        }
    }
}

/// Applies the reloaded `[[policy]]` rules. Issuers and keys are fixed at
/// startup; live grants keep their terms until they expire or are revoked.
fn reload_policy(config: &Config, services: &Services) {
    let (Some(gate), Some(auth)) = (&services.gate, &config.auth) else {
        if services.gate.is_some() != config.auth.is_some() {
            tracing::warn!("turning authentication on or off needs a restart; policy unchanged");
        }
        return;
    };
    match crate::auth::Policy::from_config(&config.policy, auth) {
        Ok(policy) => {
            gate.set_policy(policy);
            tracing::info!(
                rules = config.policy.len(),
                "reloaded the policy (live grants keep their terms)"
            );
        }
        Err(errors) => tracing::error!(
            errors = errors.len(),
            "reloaded policy is invalid; keeping the running one"
        ),
    }
}
