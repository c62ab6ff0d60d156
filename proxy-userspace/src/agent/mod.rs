//! The agent: choose the data path, install interception, serve sessions,
//! reload on SIGHUP, and shut down cleanly on SIGTERM.

mod accept;
mod auth;
mod endpoints;
mod handover;
mod lock;
mod reload;
mod startup;
pub mod takeover;

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
use takeover::{ListenerRole, ListenerSet};

pub use handover::{SUPERVISOR_ENV, TAKEN_OVER_KEY};
pub use lock::LockError;
pub use startup::StartupError;
// The pieces `run` wires together, for assembling an agent in-process
// without root (proxy-userspace/tests/gate_session).
pub use accept::{Resolver, accept_loop};
pub use auth::{AuthStartError, start as start_gate};

/// How long sessions still running after the grace period get to finish
/// their teardown.
const TEARDOWN_BOUND: Duration = Duration::from_secs(5);

/// Runs the agent until SIGTERM or SIGINT, or until a successor took it
/// over and its sessions drained. With `takeover`, first asks a running
/// agent to hand over (see [`takeover`]).
pub async fn run(config: Config, config_path: PathBuf, takeover: bool) -> Result<(), StartupError> {
    let attempt = if takeover {
        let (path, timeout) = (
            config.agent.takeover_socket.clone(),
            config.agent.takeover_timeout,
        );
        tokio::task::spawn_blocking(move || takeover::request(&path, timeout))
            .await
            .unwrap_or_default()
    } else {
        takeover::Attempt::default()
    };
    let (mut inherited, predecessor) = (attempt.listeners, attempt.predecessor);
    let mut offered = ListenerSet::default();
    let inherit = crate::intercept::Inherit {
        listeners: inherited.take_all(ListenerRole::Intercept),
        routing: predecessor.as_ref().and_then(|p| p.state.routing),
    };
    let mut started = startup::start(&config, inherit, predecessor.is_some()).await?;
    let cluster = match &config.cluster {
        Some(section) => Some(Arc::new(Cluster::connect(section).await?)),
        None => None,
    };
    let mut metrics = crate::metrics::Metrics::new(
        started.datapath.kind(),
        started.take_stats(),
        started.program_run_stats(),
    );
    if let Some(cluster) = &cluster {
        cluster.health().register(metrics.registry_mut());
    }
    let (stop_background, background) = watch::channel(false);
    let registry = crate::registry::Registry::new(config.agent.max_sessions as usize);
    let gate = auth::start(&config, &registry, started.take_grant_mirror(), &background).await?;
    if let Some(gate) = &gate {
        gate.register_metrics(metrics.registry_mut());
    }
    let routed_metrics = crate::routed::metrics::RoutedMetrics::default();
    if let Some(router) = &started.router {
        routed_metrics.register(metrics.registry_mut(), router.section.max_flows);
    }
    let metrics = Arc::new(metrics);
    let mut routed_metrics = routed_metrics;
    routed_metrics.attach(Arc::clone(&metrics));
    let audit = AuditLog::open(
        &AuditTarget::parse(&config.audit.path),
        metrics.audit_dropped(),
    )
    .await?
    .with_bastion(cluster.as_ref().map(|c| c.name()));
    let routed = match (&started.router, &gate) {
        (Some(router), Some(gate)) => {
            let hooked = Arc::clone(router);
            gate.on_grants_changed(Box::new(move |grants| hooked.sync_grants(grants)));
            let watch = crate::routed::flows::FlowWatch::new(
                Arc::clone(router),
                Arc::clone(gate),
                audit.clone(),
                config.agent.upstream_mark,
                routed_metrics,
            );
            Some(tokio::spawn(watch.run(background.clone())))
        }
        _ => None,
    };
    if let (Some(gate), Some(predecessor)) = (&gate, &predecessor) {
        gate.restore_revocations(&predecessor.state.revocations);
        handover::install_grants(gate, &predecessor.state.grants);
    }
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
        parking: crate::session::adopt::Parking::default(),
    });

    let mut listeners: Vec<(TcpListener, Resolver)> = Vec::new();
    for forward in &config.forwards {
        let listener = bind_forward(&mut inherited, forward.listen).await?;
        offered.record(ListenerRole::Forward, forward.listen, &listener);
        tracing::info!(listen = %forward.listen, upstream = %forward.upstream, "forwarding");
        let target = Target {
            destination: forward.listen,
            upstream: forward.upstream,
        };
        listeners.push((listener, Resolver::Fixed(target)));
    }
    if let Some(interceptor) = started.interceptor.clone() {
        for listener in started.take_intercept_listeners() {
            if let Ok(addr) = listener.local_addr() {
                offered.record(ListenerRole::Intercept, addr, &listener);
            }
            listeners.push((listener, Resolver::Intercept(Arc::clone(&interceptor))));
        }
        for entry in &interceptor.current().entries {
            tracing::info!(destination = %entry.destination, "intercepting");
        }
    }
    for (listener, _) in &listeners {
        // Accepted sockets inherit the stall bounds (TCP_USER_TIMEOUT,
        // keepalive) and TCP_NODELAY: set once here instead of on every
        // client socket (a predecessor's listeners too).
        if let Err(e) =
            crate::sockopt::set_stall_timeout(listener.as_fd(), config.agent.stall_timeout)
        {
            tracing::warn!(error = %e, "cannot bound stalls on a listener's sessions");
        }
        if let Err(e) = crate::sockopt::set_nodelay(listener.as_fd()) {
            tracing::warn!(error = %e, "cannot turn off Nagle's algorithm on a listener's sessions");
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
        gate: gate.clone(),
        registry: Arc::clone(&registry),
        datapath: services.datapath.clone(),
        ready: std::sync::atomic::AtomicBool::new(false),
        metrics,
        cluster: cluster.clone(),
    });
    let mut sockets = endpoints::Sockets {
        inherited: &mut inherited,
        offered: &mut offered,
    };
    let api_tls =
        endpoints::start(&config, &api_state, &accepting, &background, &mut sockets).await?;
    inherited.report_unused();
    drop(inherited);
    let successor = handover::Successor::wait(
        &config,
        takeover::Handover {
            listeners: offered,
            locks: started.locks.clone(),
            gate: gate.clone(),
            bastion: cluster
                .as_ref()
                .map(|c| c.name().to_owned())
                .unwrap_or_default(),
            routing: started.routing(),
            timeout: config.agent.takeover_timeout,
            pin_dir: started.pin_dir(),
        },
    );
    handover::taken(predecessor, &services, &tasks).await;
    let stop = if proceed {
        serve(
            &config_path,
            &services,
            &api_state,
            api_tls.as_deref(),
            successor,
        )
        .await?
    } else {
        tracing::info!("stopping before the fleet's grants were loaded");
        Stop::Signal
    };
    let _ = stop_accepting.send(true);
    api_state
        .ready
        .store(false, std::sync::atomic::Ordering::Release);
    let taken_over = matches!(stop, Stop::TakenOver(_));
    match stop {
        Stop::Signal => {
            crate::notify::status("STOPPING=1\nSTATUS=draining sessions");
            drain(&services, config.agent.shutdown_grace).await;
        }
        Stop::TakenOver(outcome) => {
            audit.mark_handed_over();
            if let Some(router) = &started.router {
                router.hand_over();
            }
            if let Some(interceptor) = &services.interceptor {
                interceptor.hand_over();
            }
            let (grace, timeout) = (config.agent.shutdown_grace, config.agent.takeover_timeout);
            handover::drain(&services, outcome, grace, timeout).await?;
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(TEARDOWN_BOUND, tasks.wait()).await;
    audit.flush().await;
    let _ = stop_background.send(true);
    if let Some(routed) = routed {
        // It ends every routed flow left, with RSTs and close lines.
        let _ = routed.await;
        audit.flush().await;
    }
    drop(services);
    if taken_over {
        started.abandon();
    } else {
        started.cleanup();
    }
    tracing::info!("tcpgate agent stopped");
    Ok(())
}

/// Why serving ended.
enum Stop {
    /// SIGTERM or SIGINT.
    Signal,
    /// A successor accepts on this agent's listeners now.
    TakenOver(takeover::Outcome),
}

/// A `[[forward]]` listener: the predecessor's, else a new one.
async fn bind_forward(
    inherited: &mut ListenerSet,
    addr: std::net::SocketAddr,
) -> Result<TcpListener, StartupError> {
    let listen_error = |source| StartupError::Listen { addr, source };
    match inherited.take(ListenerRole::Forward, addr) {
        Some(listener) => {
            listener.set_nonblocking(true).map_err(listen_error)?;
            TcpListener::from_std(listener).map_err(listen_error)
        }
        None => TcpListener::bind(addr).await.map_err(listen_error),
    }
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

/// Reports ready and serves until SIGTERM or SIGINT, or a takeover.
async fn serve(
    config_path: &Path,
    services: &Services,
    api_state: &crate::api::ApiState,
    api_tls: Option<&crate::api::TlsFiles>,
    successor: handover::Successor,
) -> Result<Stop, StartupError> {
    api_state
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    // Loading the eBPF object parsed the kernel's BTF: megabytes freed.
    crate::heap::release_free_pages();
    let datapath = services.datapath.kind().as_str();
    tracing::info!(datapath, "tcpgate agent ready");
    crate::notify::ready(&format!("serving on the {datapath} data path"));

    wait_for_termination(config_path, services, api_tls, successor).await
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
    mut successor: handover::Successor,
) -> Result<Stop, StartupError> {
    let mut term = signal(SignalKind::terminate()).map_err(StartupError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartupError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartupError::Signals)?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(StartupError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(Stop::Signal),
            _ = usr2.recv() => handover::spawn_successor(),
            _ = int.recv() => return Ok(Stop::Signal),
            outcome = successor.taken() => return Ok(Stop::TakenOver(outcome)),
            _ = hup.recv() => {
                reload::reload(config_path, services);
                reload::reload_certificate(api_tls);
            }
        }
    }
}
