//! Prometheus metrics, served on `[admin] listen` at `/metrics` in the
//! Prometheus text format (0.0.4).
//!
//! Events on the connection path (accept, deny, authenticate, connect,
//! close) are atomic counter and histogram updates: nothing here runs per
//! packet, which stays in the kernel. Values that live elsewhere (the live
//! session and grant counts, the kernel's byte counters, the eBPF programs'
//! per-CPU stats) are read when Prometheus scrapes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use proxy_common::session::DirectionCounters;
use proxy_common::stats::GlobalStats;

use crate::auth::token_cache::TokenCacheStats;
use crate::bpf::run_stats::ProgramRunStats;
use crate::datapath::DatapathKind;

mod programs;
mod register;
mod token_cache;

/// The eBPF programs' per-CPU counters.
pub type StatsMap = aya::maps::PerCpuArray<aya::maps::MapData, GlobalStats>;

/// `Content-Type` of the `/metrics` answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLimitLabels {
    server: &'static str,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatapathLabels {
    datapath: &'static str,
}

type Histograms = Family<ResultLabels, Histogram, fn() -> Histogram>;

/// Authentication can wait for a slow preamble (seconds); a source grant
/// admits in microseconds.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ])
}

/// The expiry target is 100 ms; the buckets resolve around it.
fn teardown_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
    ])
}

/// What a scrape reads from the rest of the agent.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub live_sessions: usize,
    pub live_grants: usize,
    /// Current counters of every live session (up, down).
    pub live_counters: Vec<(DirectionCounters, DirectionCounters)>,
    /// The verified-token cache, with `[auth]`.
    pub token_cache: Option<TokenCacheStats>,
}

/// Index into [`Metrics::closed_bytes`] (the first four) and into the
/// byte totals of a scrape.
const KERNEL_UP: usize = 0;
const KERNEL_DOWN: usize = 1;
const USER_UP: usize = 2;
const USER_DOWN: usize = 3;
const ROUTED_UP: usize = 4;
const ROUTED_DOWN: usize = 5;
const BYTE_SERIES: [(usize, &str, &str); 6] = [
    (KERNEL_UP, "up", "kernel"),
    (KERNEL_DOWN, "down", "kernel"),
    (USER_UP, "up", "userspace"),
    (USER_DOWN, "down", "userspace"),
    (ROUTED_UP, "up", "routed"),
    (ROUTED_DOWN, "down", "routed"),
];

/// Routed flows (`[intercept.routed_grants]`) as the flow watch last saw
/// them: the tc programs count their bytes, the agent never holds them.
#[derive(Debug, Default)]
struct RoutedFigures {
    live: AtomicU64,
    /// Every byte of every routed flow so far, ended ones included.
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// The agent's metrics; shared by the sessions and the admin endpoint.
pub struct Metrics {
    registry: Registry,
    accepted: Counter,
    denied: Family<ReasonLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    auth_seconds: Histograms,
    connect_seconds: Histograms,
    expiry_teardown_seconds: Histogram,
    sessions_live: Gauge,
    grants_live: Gauge,
    bytes: Family<BytesLabels, Counter>,
    /// Final counters of ended sessions, added when each ends.
    closed_bytes: [AtomicU64; 4],
    routed: RoutedFigures,
    limit_hits: Family<LimitLabels, Counter>,
    audit_dropped: Counter,
    ebpf_redirect_failures: Counter,
    ebpf_redirected_skbs: Counter,
    ebpf_lookups_steered: Counter,
    ebpf_lookups_no_listener: Counter,
    ebpf_retransmit_overlap_bytes: Counter,
    ebpf_retransmit_overlap_untrimmed: Counter,
    stats: Option<Mutex<StatsMap>>,
    /// Scrapes turn totals into counter increments; one at a time.
    scrape: Mutex<()>,
    http_limit_hits: Family<HttpLimitLabels, Counter>,
    token_cache: token_cache::TokenCacheMetrics,
    programs: programs::ProgramMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics for an agent running `datapath`; `stats` is the eBPF
    /// programs' counter map and `programs` their run statistics, when
    /// eBPF is loaded.
    #[must_use]
    pub fn new(
        datapath: DatapathKind,
        stats: Option<StatsMap>,
        programs: Option<ProgramRunStats>,
    ) -> Self {
        let mut metrics = Self {
            accepted: Counter::default(),
            denied: Family::default(),
            closed: Family::default(),
            auth_seconds: Family::new_with_constructor(latency_histogram),
            connect_seconds: Family::new_with_constructor(latency_histogram),
            expiry_teardown_seconds: teardown_histogram(),
            sessions_live: Gauge::default(),
            grants_live: Gauge::default(),
            bytes: Family::default(),
            closed_bytes: Default::default(),
            routed: RoutedFigures::default(),
            limit_hits: Family::default(),
            audit_dropped: Counter::default(),
            ebpf_redirect_failures: Counter::default(),
            ebpf_redirected_skbs: Counter::default(),
            ebpf_lookups_steered: Counter::default(),
            ebpf_lookups_no_listener: Counter::default(),
            ebpf_retransmit_overlap_bytes: Counter::default(),
            ebpf_retransmit_overlap_untrimmed: Counter::default(),
            stats: stats.map(Mutex::new),
            scrape: Mutex::new(()),
            registry: Registry::with_prefix("tcpgate"),
            http_limit_hits: Family::default(),
            token_cache: token_cache::TokenCacheMetrics::default(),
            programs: programs::ProgramMetrics::new(programs),
        };
        metrics.register(datapath);
        metrics.token_cache.register(&mut metrics.registry);
        metrics.programs.register(&mut metrics.registry);
        metrics.registry.register(
            "http_limit_hits",
            "HTTP connections cut by a bound, by server (api, admin) and limit (header_timeout, idle_timeout, max_body, max_header_bytes, max_connections, unauthorized)",
            metrics.http_limit_hits.clone(),
        );
        metrics
    }

    /// For metrics kept elsewhere (the cluster's), added before sharing.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// A connection was admitted.
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    /// A connection was refused for `reason` (a stable reason string).
    pub fn denied(&self, reason: &str) {
        self.denied
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A bound was hit (`limit` names its config field).
    pub fn limit_hit(&self, limit: &'static str) {
        self.limit_hits.get_or_create(&LimitLabels { limit }).inc();
    }

    /// The counter the audit log adds its dropped lines to.
    #[must_use]
    pub fn audit_dropped(&self) -> Counter {
        self.audit_dropped.clone()
    }

    /// How long admission took.
    pub fn authenticated(&self, admitted: bool, took: Duration) {
        let result = if admitted { "admitted" } else { "denied" };
        self.auth_seconds
            .get_or_create(&ResultLabels { result })
            .observe(took.as_secs_f64());
    }

    /// How long the upstream connect took.
    pub fn upstream_connected(&self, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.connect_seconds
            .get_or_create(&ResultLabels { result })
            .observe(took.as_secs_f64());
    }

    /// A session ended: its reason, its final counters, and for an expiry
    /// the grant's end, to measure how late the teardown finished.
    pub fn session_closed(
        &self,
        reason: &str,
        up: &DirectionCounters,
        down: &DirectionCounters,
        expired_at: Option<SystemTime>,
    ) {
        for (index, value) in [
            (KERNEL_UP, up.kernel_bytes),
            (KERNEL_DOWN, down.kernel_bytes),
            (USER_UP, up.userspace_bytes),
            (USER_DOWN, down.userspace_bytes),
        ] {
            self.closed_bytes[index].fetch_add(value, Ordering::Relaxed);
        }
        self.closed
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
        if let Some(expired_at) = expired_at {
            let late = SystemTime::now()
                .duration_since(expired_at)
                .unwrap_or_default();
            self.expiry_teardown_seconds.observe(late.as_secs_f64());
        }
    }

    /// The routed flows' live count and byte totals (every flow so far,
    /// from `FLOWS` and the ended ones), at each poll of the flow watch.
    pub fn routed_progress(&self, live: usize, bytes_up: u64, bytes_down: u64) {
        let routed = &self.routed;
        routed
            .live
            .store(u64::try_from(live).unwrap_or(u64::MAX), Ordering::Relaxed);
        routed.bytes_up.store(bytes_up, Ordering::Relaxed);
        routed.bytes_down.store(bytes_down, Ordering::Relaxed);
    }

    /// An HTTP server (`api`, `admin`) refused or cut a connection at
    /// `limit`.
    pub fn http_limit_hit(&self, server: &'static str, limit: &'static str) {
        self.http_limit_hits
            .get_or_create(&HttpLimitLabels { server, limit })
            .inc();
    }

    /// Reads the scrape-time values and renders every metric.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        let routed_live = self.routed.live.load(Ordering::Relaxed);
        let live = u64::try_from(snapshot.live_sessions).unwrap_or(u64::MAX);
        self.sessions_live
            .set(i64::try_from(live.saturating_add(routed_live)).unwrap_or(i64::MAX));
        self.grants_live
            .set(i64::try_from(snapshot.live_grants).unwrap_or(i64::MAX));
        let mut totals = [0u64; BYTE_SERIES.len()];
        for (total, closed) in totals.iter_mut().zip(&self.closed_bytes) {
            *total = closed.load(Ordering::Relaxed);
        }
        totals[ROUTED_UP] = self.routed.bytes_up.load(Ordering::Relaxed);
        totals[ROUTED_DOWN] = self.routed.bytes_down.load(Ordering::Relaxed);
        for (up, down) in &snapshot.live_counters {
            totals[KERNEL_UP] += up.kernel_bytes;
            totals[KERNEL_DOWN] += down.kernel_bytes;
            totals[USER_UP] += up.userspace_bytes;
            totals[USER_DOWN] += down.userspace_bytes;
        }
        for (index, direction, path) in BYTE_SERIES {
            advance(
                &self.bytes.get_or_create(&BytesLabels { direction, path }),
                totals[index],
            );
        }
        if let Some(cache) = &snapshot.token_cache {
            self.token_cache.update(cache);
        }
        if let Some(stats) = self.read_stats() {
            advance(&self.ebpf_redirect_failures, stats.redirect_failures);
            advance(&self.ebpf_redirected_skbs, stats.redirected_skbs);
            advance(&self.ebpf_lookups_steered, stats.lookups_steered);
            advance(&self.ebpf_lookups_no_listener, stats.lookups_no_listener);
            advance(&self.ebpf_retransmit_overlap_bytes, stats.overlap_bytes);
            advance(
                &self.ebpf_retransmit_overlap_untrimmed,
                stats.overlap_untrimmed,
            );
        }
        self.programs.update();
        let mut text = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        text
    }

    /// The eBPF counters, summed over the CPUs.
    fn read_stats(&self) -> Option<GlobalStats> {
        let stats = self.stats.as_ref()?;
        let map = stats.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(&0, 0) {
            Ok(per_cpu) => Some(sum_cpus(per_cpu.iter())),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the eBPF stats map");
                None
            }
        }
    }
}

/// Sums the per-CPU slots of the stats map.
pub fn sum_cpus<'a>(slots: impl Iterator<Item = &'a GlobalStats>) -> GlobalStats {
    slots.fold(GlobalStats::default(), |mut sum, s| {
        sum.redirected_skbs += s.redirected_skbs;
        sum.redirect_failures += s.redirect_failures;
        sum.unknown_socket_skbs += s.unknown_socket_skbs;
        sum.fin_passed += s.fin_passed;
        sum.lookups_steered += s.lookups_steered;
        sum.lookups_no_listener += s.lookups_no_listener;
        sum.overlap_skbs += s.overlap_skbs;
        sum.overlap_bytes += s.overlap_bytes;
        sum.overlap_untrimmed += s.overlap_untrimmed;
        sum
    })
}

/// Raises a counter to `total`. A total can dip for a moment (a session's
/// map entry is gone before its final counters are added to the closed
/// sums); the counter then waits instead of going backwards.
pub(crate) fn advance(counter: &Counter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

#[cfg(test)]
mod tests;
