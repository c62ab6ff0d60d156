//! How this bastion stands with the fleet's store: for `/readyz` and
//! `/metrics`.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// What the sync loop did with a record from the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Applied {
    /// A grant from another bastion, now live here.
    GrantInstalled,
    /// A grant that ended elsewhere (given back or revoked), ended here.
    GrantEnded,
    RevocationApplied,
    /// A record this bastion could not use (bad JSON, or refused).
    Rejected,
}

impl Applied {
    fn as_str(self) -> &'static str {
        match self {
            Self::GrantInstalled => "grant_installed",
            Self::GrantEnded => "grant_ended",
            Self::RevocationApplied => "revocation_applied",
            Self::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// Shared by the sync loop (writer) and the HTTP handlers (readers).
#[derive(Debug)]
pub struct Health {
    connected: AtomicBool,
    /// The last etcd revision applied here.
    revision: AtomicI64,
    /// When the watch last confirmed that everything up to `revision` was
    /// applied (a progress notification, or a full read).
    caught_up: Mutex<Option<Instant>>,
    /// True once the fleet's grants and revocations were first loaded.
    synced: watch::Sender<bool>,
    connected_gauge: Gauge,
    revision_gauge: Gauge,
    lag_gauge: Gauge<f64, std::sync::atomic::AtomicU64>,
    applied: Family<ActionLabels, Counter>,
    resyncs: Counter,
    publish_failures: Counter,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            connected: AtomicBool::new(false),
            revision: AtomicI64::new(0),
            caught_up: Mutex::new(None),
            synced: watch::channel(false).0,
            connected_gauge: Gauge::default(),
            revision_gauge: Gauge::default(),
            lag_gauge: Gauge::default(),
            applied: Family::default(),
            resyncs: Counter::default(),
            publish_failures: Counter::default(),
        }
    }
}

impl Health {
    /// Adds the cluster metrics to the agent's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cluster_connected",
            "1 while this bastion's watch on the fleet's etcd is open",
            self.connected_gauge.clone(),
        );
        registry.register(
            "cluster_revision",
            "The last etcd revision applied on this bastion",
            self.revision_gauge.clone(),
        );
        registry.register(
            "cluster_lag_seconds",
            "Seconds since etcd last confirmed this bastion had applied every change (about 1 while healthy)",
            self.lag_gauge.clone(),
        );
        registry.register(
            "cluster_records",
            "Fleet records applied here, by action (grant_installed, grant_ended, revocation_applied, rejected)",
            self.applied.clone(),
        );
        registry.register(
            "cluster_resyncs",
            "Full reloads of the fleet's records (first start, or a compacted revision)",
            self.resyncs.clone(),
        );
        registry.register(
            "cluster_publish_failures",
            "Grants or revocations etcd did not take (the API answered 503)",
            self.publish_failures.clone(),
        );
    }

    pub(super) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
        self.connected_gauge.set(i64::from(connected));
    }

    #[must_use]
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Everything up to `revision` is applied.
    pub(super) fn caught_up(&self, revision: i64) {
        self.applied_up_to(revision);
        *self
            .caught_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    pub(super) fn applied_up_to(&self, revision: i64) {
        let latest = self
            .revision
            .fetch_max(revision, Ordering::AcqRel)
            .max(revision);
        self.revision_gauge.set(latest);
    }

    pub(super) fn applied(&self, action: Applied) {
        self.applied
            .get_or_create(&ActionLabels {
                action: action.as_str(),
            })
            .inc();
    }

    pub(super) fn resynced(&self) {
        self.resyncs.inc();
    }

    pub fn publish_failed(&self) {
        self.publish_failures.inc();
    }

    pub(super) fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    /// Waits until the fleet's records were first loaded.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.subscribe();
        let _ = synced.wait_for(|s| *s).await;
    }

    #[must_use]
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Seconds since the last confirmation; `None` before the first.
    #[must_use]
    pub fn lag(&self) -> Option<f64> {
        self.caught_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|at| at.elapsed().as_secs_f64())
    }

    /// Brings the lag gauge up to now (before a scrape).
    pub fn refresh(&self) {
        self.lag_gauge.set(self.lag().unwrap_or(f64::INFINITY));
    }

    /// One line for `/readyz`.
    #[must_use]
    pub fn summary(&self, name: &str) -> String {
        let state = if self.connected() {
            "connected"
        } else {
            "disconnected"
        };
        let lag = self
            .lag()
            .map_or_else(|| "never synced".to_owned(), |l| format!("lag {l:.1}s"));
        format!(
            "cluster {name}: {state}, revision {}, {lag}\n",
            self.revision()
        )
    }
}
