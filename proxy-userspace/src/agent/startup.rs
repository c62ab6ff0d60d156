//! Startup: the instance lock, stale state from a crashed predecessor, and
//! the data path (eBPF when it loads, else the user-space fallback).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::audit::AuditError;
use crate::bpf::{LoadedBpf, MapSizes};
use crate::config::{Config, DatapathChoice};
use crate::datapath::Datapath;
use crate::datapath::ebpf::{EbpfDatapath, EbpfSetupError};
use crate::datapath::userspace::UserspaceDatapath;

use super::lock::{InstanceLock, LockError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("the eBPF data path was requested (--datapath ebpf) but cannot start")]
    Ebpf(#[source] EbpfSetupError),
    #[error("cannot clean up pins left by a previous agent in {dir}")]
    StalePins {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
}

/// What startup built; [`Started::cleanup`] undoes it.
pub struct Started {
    pub datapath: Datapath,
    /// Keeps programs attached and maps alive.
    bpf: Option<LoadedBpf>,
    _lock: InstanceLock,
    _logger: Option<tokio::task::JoinHandle<()>>,
}

pub async fn start(config: &Config) -> Result<Started, StartupError> {
    let choice = config.agent.datapath;
    let pin_dir = &config.agent.pin_dir;
    let wants_bpf = choice != DatapathChoice::Userspace;
    let lock = InstanceLock::acquire(wants_bpf.then_some(pin_dir.as_path()))?;
    if wants_bpf {
        let removed =
            crate::bpf::remove_pin_files(pin_dir).map_err(|source| StartupError::StalePins {
                dir: pin_dir.clone(),
                source,
            })?;
        if !removed.is_empty() {
            tracing::warn!(pins = ?removed, "removed pins left behind by a previous agent that did not shut down cleanly");
        }
    }
    let loaded = if wants_bpf {
        Some(load_ebpf(config))
    } else {
        None
    };
    match (choice, loaded) {
        (_, Some(Ok((bpf, datapath, logger)))) => Ok(Started {
            datapath: Datapath::Ebpf(Arc::new(datapath)),
            bpf: Some(bpf),
            _lock: lock,
            _logger: logger,
        }),
        (DatapathChoice::Ebpf, Some(Err(e))) => Err(StartupError::Ebpf(e)),
        (_, loaded) => {
            if let Some(Err(e)) = loaded {
                tracing::warn!(
                    reason = %crate::error_chain(&e),
                    "eBPF data path unavailable; falling back to the user-space copy (slower, but byte-exact)"
                );
                let _ = crate::bpf::remove_pin_files(pin_dir);
            }
            Ok(Started {
                datapath: Datapath::Userspace(Arc::new(UserspaceDatapath::default())),
                bpf: None,
                _lock: lock,
                _logger: None,
            })
        }
    }
}

type Loaded = (LoadedBpf, EbpfDatapath, Option<tokio::task::JoinHandle<()>>);

fn load_ebpf(config: &Config) -> Result<Loaded, EbpfSetupError> {
    let sizes = MapSizes {
        max_sessions: config.agent.max_sessions,
    };
    let mut bpf = LoadedBpf::load(sizes, &config.agent.pin_dir)?;
    let logger = spawn_ebpf_logger(&mut bpf);
    bpf.pin_maps()?;
    let datapath = EbpfDatapath::attach(&mut bpf, config.agent.drain_timeout)?;
    Ok((bpf, datapath, logger))
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
    /// Detaches programs and removes pins.
    pub fn cleanup(self) {
        let pin_dir = self.bpf.as_ref().map(|b| b.pin_dir.clone());
        drop(self.bpf);
        if let Some(dir) = pin_dir {
            match crate::bpf::remove_pins(&dir) {
                Ok(removed) => tracing::debug!(pins = removed.len(), "pins removed"),
                Err(e) => tracing::error!(dir = %dir.display(), error = %e, "cannot remove pins"),
            }
        }
    }
}
