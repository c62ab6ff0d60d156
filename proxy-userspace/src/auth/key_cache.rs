//! The per-issuer key cache: the current [`KeySet`], refreshed periodically
//! and, rate-limited, when a token names an unknown `kid`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::jwks::{JwksSource, KeySet, VerifyKey, error_chain};

/// Refresh counters of one issuer's key cache, for metrics.
#[derive(Debug, Default)]
pub struct JwksStats {
    pub refresh_attempts: AtomicU64,
    pub refresh_failures: AtomicU64,
    /// Unknown-`kid` refreshes skipped because one ran too recently.
    pub refresh_rate_limited: AtomicU64,
}

/// A point-in-time copy of [`JwksStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct JwksStatsSnapshot {
    pub refresh_attempts: u64,
    pub refresh_failures: u64,
    pub refresh_rate_limited: u64,
}

/// The current keys of one issuer, with bounded on-demand refresh.
#[derive(Debug)]
pub struct KeyCache {
    source: JwksSource,
    current: RwLock<Arc<KeySet>>,
    /// Serializes fetches; holds the time of the last on-demand refresh.
    on_demand: tokio::sync::Mutex<Option<Instant>>,
    /// Bumped after every fetch attempt, so waiters can tell one happened.
    generation: AtomicU64,
    /// Bumped when a fetch brought a different key set (rotation).
    key_version: AtomicU64,
    min_refresh_interval: Duration,
    stats: JwksStats,
    /// Why the last fetch failed; `None` once one succeeds.
    last_error: RwLock<Option<String>>,
    /// `tcpgate_auth_key_fetch_failures_total` for this issuer.
    failures_metric: prometheus_client::metrics::counter::Counter,
}

impl KeyCache {
    pub fn new(source: JwksSource, initial: KeySet, min_refresh_interval: Duration) -> KeyCache {
        KeyCache {
            source,
            current: RwLock::new(Arc::new(initial)),
            on_demand: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            key_version: AtomicU64::new(0),
            min_refresh_interval,
            stats: JwksStats::default(),
            last_error: RwLock::new(None),
            failures_metric: prometheus_client::metrics::counter::Counter::default(),
        }
    }

    /// Counts every failed fetch in `counter` too (the metric).
    #[must_use]
    pub fn counting_failures(
        mut self,
        counter: prometheus_client::metrics::counter::Counter,
    ) -> KeyCache {
        self.failures_metric = counter;
        self
    }

    /// Why the last fetch failed, while no later fetch has succeeded.
    pub fn last_error(&self) -> Option<String> {
        match self.last_error.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set_last_error(&self, error: Option<String>) {
        match self.last_error.write() {
            Ok(mut g) => *g = error,
            Err(poisoned) => *poisoned.into_inner() = error,
        }
    }

    pub fn keys(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Moves whenever the key set changes; answers verified with the old
    /// keys are stale then.
    pub fn key_version(&self) -> u64 {
        self.key_version.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> JwksStatsSnapshot {
        JwksStatsSnapshot {
            refresh_attempts: self.stats.refresh_attempts.load(Ordering::Relaxed),
            refresh_failures: self.stats.refresh_failures.load(Ordering::Relaxed),
            refresh_rate_limited: self.stats.refresh_rate_limited.load(Ordering::Relaxed),
        }
    }

    /// Looks up `kid`; on a miss, refreshes once (rate-limited, shared with
    /// concurrent misses) and looks again.
    pub async fn find(&self, kid: Option<&str>) -> Option<VerifyKey> {
        if let Some(k) = self.keys().find(kid) {
            return Some(k.clone());
        }
        self.refresh_on_demand().await;
        self.keys().find(kid).cloned()
    }

    async fn refresh_on_demand(&self) {
        let seen = self.generation.load(Ordering::Acquire);
        let mut last = self.on_demand.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return; // Another task refreshed while we waited: share its result.
        }
        if last.is_some_and(|t| t.elapsed() < self.min_refresh_interval) {
            self.stats
                .refresh_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        self.fetch_and_swap("unknown kid").await;
    }

    /// Refreshes now (used by the periodic task). Not rate-limited.
    pub async fn refresh(&self) {
        let _serialized = self.on_demand.lock().await;
        self.fetch_and_swap("periodic").await;
    }

    async fn fetch_and_swap(&self, why: &str) {
        self.stats.refresh_attempts.fetch_add(1, Ordering::Relaxed);
        match self.source.fetch().await {
            Ok(set) => {
                tracing::debug!(source = %self.source.describe(), keys = set.len(), why, "JWKS refreshed");
                let changed = {
                    let mut current = self
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let changed = current.fingerprint != set.fingerprint;
                    *current = Arc::new(set);
                    changed
                };
                if changed {
                    self.key_version.fetch_add(1, Ordering::AcqRel);
                }
                self.set_last_error(None);
            }
            Err(e) => {
                self.stats.refresh_failures.fetch_add(1, Ordering::Relaxed);
                self.failures_metric.inc();
                self.set_last_error(Some(error_chain(&e)));
                tracing::warn!(source = %self.source.describe(), why, error = %error_chain(&e),
                    "JWKS refresh failed; keeping the last good key set");
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }
}
