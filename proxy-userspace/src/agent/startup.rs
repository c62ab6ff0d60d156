//! Startup: the instance lock, stale state from a crashed predecessor, the
//! data path (eBPF when it loads, else the user-space fallback), and
//! interception.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::audit::AuditError;
use crate::bpf::{LoadedBpf, MapSizes};
use crate::config::{Config, DatapathChoice};
use crate::datapath::Datapath;
use crate::datapath::ebpf::{EbpfDatapath, EbpfSetupError, Timeouts};
use crate::datapath::userspace::UserspaceDatapath;
use crate::intercept::{Inherit, InterceptError, Interceptor};

use super::lock::{LockError, LockSlot, NamespaceLock, PinDirLock};

/// Why eBPF is not available: the agent's own pin-directory lock, or the
/// data path's setup. Kept here so the data path never names agent types.
#[derive(Debug, thiserror::Error)]
pub enum BpfUnavailable {
    #[error("cannot use the pin directory")]
    PinDir(#[source] LockError),
    #[error(transparent)]
    Setup(#[from] EbpfSetupError),
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("the eBPF data path was requested (--datapath ebpf) but cannot start")]
    Ebpf(#[source] BpfUnavailable),
    #[error("cannot clean up pins left by a previous agent in {dir}")]
    StalePins {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot route granted flows (intercept.routed_grants)")]
    Routed(#[from] crate::routed::RoutedError),
    #[error("cannot install interception")]
    Intercept(#[from] InterceptError),
    #[error("interception needs eBPF (the sk_lookup program), which cannot load")]
    InterceptNeedsBpf(#[source] BpfUnavailable),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Auth(#[from] super::auth::AuthStartError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error("cannot set up [cluster]")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// What startup built; [`Started::cleanup`] undoes it.
pub struct Started {
    pub datapath: Datapath,
    pub interceptor: Option<Arc<Interceptor>>,
    /// `[intercept.routed_grants]`, when enabled.
    pub router: Option<Arc<crate::routed::Router>>,
    intercept_listeners: Vec<TcpListener>,
    /// Keeps programs attached and maps alive.
    bpf: Option<LoadedBpf>,
    /// `agent.keep_pins`: leave the pinned maps for inspection on exit.
    keep_pins: bool,
    pub locks: LockSlot,
    _logger: Option<tokio::task::JoinHandle<()>>,
}

/// Starts from scratch, or (`inherit` from a predecessor that released
/// its locks) on the predecessor's listeners and routing.
pub async fn start(
    config: &Config,
    inherit: Inherit,
    taking_over: bool,
) -> Result<Started, StartupError> {
    let result = start_locked(config, inherit, taking_over).await;
    if let Err(e) = &result {
        // Past the locks the pin directory is ours: a failed start (say, a
        // verifier rejection) leaves no pinned maps behind. Someone else's
        // pins (a lock error) are never touched.
        if !matches!(e, StartupError::Lock(_)) {
            let _ = crate::bpf::remove_pins(&config.agent.pin_dir);
        }
    }
    result
}

async fn start_locked(
    config: &Config,
    inherit: Inherit,
    taking_over: bool,
) -> Result<Started, StartupError> {
    let choice = config.agent.datapath;
    let pin_dir = &config.agent.pin_dir;
    let intercepting = config.intercept.is_some();
    // Interception always needs eBPF (sk_lookup), whatever moves the bytes.
    let wants_bpf = choice != DatapathChoice::Userspace || intercepting;
    let lock = NamespaceLock::acquire()?;
    let (mut bpf, mut logger, mut load_error) = (None, None, None);
    let mut pin_lock = None;
    if wants_bpf {
        match PinDirLock::acquire(pin_dir) {
            Ok(locked) => pin_lock = Some(locked),
            // Someone else's pins, or a directory another user could
            // change them in: never touch them, whatever the data path.
            Err(e @ (LockError::PinDirTaken(_) | LockError::Untrusted { .. })) => {
                return Err(e.into());
            }
            // No permission to create or lock the directory: eBPF would not
            // load either; `auto` falls back below.
            Err(e) => load_error = Some(BpfUnavailable::PinDir(e)),
        }
    }
    let mut previous_flows = None;
    if pin_lock.is_some() {
        // Open before the stale pins go: its flows are carried over.
        if config.intercept.as_ref().and_then(|i| i.routed()).is_some() {
            previous_flows =
                crate::routed::handover::Previous::open(&pin_dir.join(crate::routed::FLOWS_PIN));
        }
        let removed =
            crate::bpf::remove_pin_files(pin_dir).map_err(|source| StartupError::StalePins {
                dir: pin_dir.clone(),
                source,
            })?;
        let stale = crate::drain_pins::remove_stale(pin_dir);
        if !stale.is_empty() {
            tracing::warn!(dirs = ?stale, "removed the pins of taken-over agents that did not finish draining");
        }
        if taking_over {
            // Its maps live on in the old agent until its sessions end.
            tracing::info!(
                pins = removed.len(),
                "replacing the pins of the agent taken over"
            );
        } else if !removed.is_empty() {
            tracing::warn!(pins = ?removed, "removed pins left behind by a previous agent (it did not shut down cleanly, or kept them with agent.keep_pins)");
        }
        match load_object(config) {
            Ok((loaded, log_task)) => {
                bpf = Some(loaded);
                logger = log_task;
            }
            Err(e) => load_error = Some(e.into()),
        }
    }
    let datapath = match (&mut bpf, choice) {
        (_, DatapathChoice::Userspace) => {
            Datapath::Userspace(Arc::new(UserspaceDatapath::new(config.agent.stall_timeout)))
        }
        (Some(loaded), _) => match EbpfDatapath::attach(
            loaded,
            Timeouts {
                drain: config.agent.drain_timeout,
                stall: config.agent.stall_timeout,
                sndbuf: config.agent.splice_sndbuf,
                queue_limit: config.agent.splice_queue_limit,
                splice_after: config.agent.splice_after_bytes,
            },
        ) {
            Ok(dp) => Datapath::Ebpf(Arc::new(dp)),
            Err(e) if choice == DatapathChoice::Ebpf => return Err(StartupError::Ebpf(e.into())),
            Err(e) => fallback(&e, config),
        },
        (None, _) => match load_error.take() {
            Some(e) if choice == DatapathChoice::Ebpf => return Err(StartupError::Ebpf(e)),
            Some(e) => {
                let datapath = fallback(&e, config);
                load_error = Some(e);
                datapath
            }
            None => {
                Datapath::Userspace(Arc::new(UserspaceDatapath::new(config.agent.stall_timeout)))
            }
        },
    };
    let (interceptor, intercept_listeners) = match (&config.intercept, &mut bpf, load_error) {
        (Some(section), Some(loaded), _) => {
            let (interceptor, listeners) = Interceptor::start(
                loaded,
                section,
                config.intercept_set.clone(),
                config.agent.upstream_mark,
                inherit,
            )?;
            (Some(Arc::new(interceptor)), listeners)
        }
        (Some(_), None, Some(e)) => return Err(StartupError::InterceptNeedsBpf(e)),
        _ => (None, Vec::new()),
    };
    let router = match (&config.intercept, &mut bpf) {
        (Some(section), Some(loaded)) => match section.routed() {
            Some(routed) => {
                let interfaces = section.interfaces.as_deref().unwrap_or_default();
                let router =
                    crate::routed::Router::start(loaded, routed, interfaces, previous_flows)?;
                tracing::info!(
                    ?interfaces,
                    "routing granted flows (intercept.routed_grants)"
                );
                Some(Arc::new(router))
            }
            None => None,
        },
        _ => None,
    };
    if bpf.is_none() && pin_lock.is_some() {
        let _ = crate::bpf::remove_pins(pin_dir);
        pin_lock = None;
    }
    Ok(Started {
        datapath,
        interceptor,
        router,
        intercept_listeners,
        bpf,
        keep_pins: config.agent.keep_pins,
        locks: LockSlot::new(lock, pin_lock.map(|l| (l, pin_dir.clone()))),
        _logger: logger,
    })
}

fn fallback(reason: &(dyn std::error::Error + 'static), config: &Config) -> Datapath {
    tracing::warn!(
        reason = %crate::error_chain(reason),
        "eBPF data path unavailable; falling back to the user-space copy (slower, but byte-exact)"
    );
    Datapath::Userspace(Arc::new(UserspaceDatapath::new(config.agent.stall_timeout)))
}

type LoadedObject = (LoadedBpf, Option<tokio::task::JoinHandle<()>>);

fn load_object(config: &Config) -> Result<LoadedObject, EbpfSetupError> {
    // Preamble grants live as long as their session (or a pending
    // admission); source grants up to their cap; one marker record.
    let grant_room = config.auth.as_ref().map_or(0, |a| {
        a.limits
            .max_grants
            .saturating_add(a.limits.pending_connections)
    });
    let sizes = MapSizes {
        max_sessions: config.agent.max_sessions,
        grants: config
            .agent
            .max_sessions
            .saturating_add(u32::try_from(grant_room).unwrap_or(u32::MAX))
            .saturating_add(1),
        skb_cb_offset: crate::kernel_btf::skb_cb_offset(),
        flows: config
            .intercept
            .as_ref()
            .and_then(|i| i.routed())
            .map_or(1, |r| r.max_flows),
    };
    let mut bpf = LoadedBpf::load(sizes, &config.agent.pin_dir)?;
    let logger = spawn_ebpf_logger(&mut bpf);
    bpf.pin_maps()?;
    if let Some(group) = &config.agent.operator_group {
        // Validated with the config; a group deleted since is a load error.
        let gid = crate::config::resolve_group(group).map_err(|e| {
            crate::bpf::BpfError::OperatorAccess {
                path: config.agent.pin_dir.clone(),
                gid: u32::MAX,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, crate::error_chain(&e)),
            }
        })?;
        crate::bpf::grant_operator_access(&config.agent.pin_dir, gid)?;
        tracing::info!(dir = %config.agent.pin_dir.display(), group, "pinned maps readable by the operator group");
    }
    Ok((bpf, logger))
}

/// Forwards the rare events the eBPF programs log (redirect failures) to
/// tracing. Logging is optional: the data path works without it.
fn spawn_ebpf_logger(bpf: &mut LoadedBpf) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match aya_log::EbpfLogger::init(&mut bpf.ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!(error = %e, "eBPF log forwarding unavailable");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd
    // wrapping it lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered.map_err(|e| e.into_parts().1) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "eBPF log forwarding unavailable");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

impl Started {
    /// The pinned `grants` map, handed to the gate once.
    pub fn take_grant_mirror(&mut self) -> Option<crate::gate::GrantMirror> {
        let bpf = self.bpf.as_mut()?;
        let map = bpf.take_map(proxy_common::map_names::GRANTS).ok()?;
        match crate::bpf::typed(proxy_common::map_names::GRANTS, map) {
            Ok(map) => Some(crate::gate::GrantMirror::new(map)),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "grants will not be pinned");
                None
            }
        }
    }

    /// The loaded programs' run statistics, for `/metrics`.
    pub fn program_run_stats(&self) -> Option<crate::bpf::run_stats::ProgramRunStats> {
        self.bpf
            .as_ref()
            .map(crate::bpf::run_stats::ProgramRunStats::of)
    }

    /// The per-CPU `stats` map, for the metrics endpoint.
    pub fn take_stats(&mut self) -> Option<crate::metrics::StatsMap> {
        let bpf = self.bpf.as_mut()?;
        let map = bpf.take_map(proxy_common::map_names::STATS).ok()?;
        match crate::bpf::typed(proxy_common::map_names::STATS, map) {
            Ok(map) => Some(map),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "eBPF counters will not be in /metrics");
                None
            }
        }
    }

    /// The transparent listeners, handed to the accept loops once.
    pub fn take_intercept_listeners(&mut self) -> Vec<TcpListener> {
        std::mem::take(&mut self.intercept_listeners)
    }

    /// The pin directory, when eBPF is loaded (and maps are pinned).
    #[must_use]
    pub fn pin_dir(&self) -> Option<PathBuf> {
        self.bpf.as_ref().map(|b| b.pin_dir.clone())
    }

    /// The routing interception installed, for a successor to compare.
    #[must_use]
    pub fn routing(&self) -> Option<crate::intercept::RoutingParams> {
        self.interceptor.as_ref().map(|i| i.routing_params())
    }

    /// After a takeover: the pins, the sk_lookup link, the routes and the
    /// intercept table are the successor's now, and stay. Dropping the
    /// object only detaches this agent's own (drained) programs.
    pub fn abandon(self) {
        let pin_dir = self.pin_dir();
        drop(self.bpf);
        if let Some(dir) = pin_dir
            && let Err(e) = crate::drain_pins::remove(&dir, std::process::id())
        {
            tracing::warn!(error = %e, "cannot remove this agent's draining pins");
        }
        tracing::info!("left the pins, routes and interception to the successor");
    }

    /// Removes routing, detaches programs and removes pins.
    pub fn cleanup(self) {
        if let Some(router) = &self.router {
            router.shutdown();
        }
        if let Some(interceptor) = &self.interceptor {
            interceptor.shutdown();
        }
        let pin_dir = self.bpf.as_ref().map(|b| b.pin_dir.clone());
        drop(self.bpf);
        if let (Some(dir), true) = (&pin_dir, self.keep_pins) {
            tracing::info!(dir = %dir.display(), "keeping the pinned maps for inspection (agent.keep_pins); the next start removes them");
            return;
        }
        if let Some(dir) = pin_dir {
            match crate::bpf::remove_pins(&dir) {
                Ok(removed) => tracing::debug!(pins = removed.len(), "pins removed"),
                Err(e) => tracing::error!(dir = %dir.display(), error = %e, "cannot remove pins"),
            }
        }
    }
}
