//! The verified-token cache's metrics, read from the gate at each scrape.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::auth::token_cache::TokenCacheStats;

#[derive(Debug, Default)]
pub struct TokenCacheMetrics {
    hits: Counter,
    misses: Counter,
    evictions: Counter,
    entries: Gauge,
    capacity: Gauge,
}

impl TokenCacheMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "token_cache_hits",
            "Token preambles and API tokens found verified in the token cache (no signature check)",
            self.hits.clone(),
        );
        registry.register(
            "token_cache_misses",
            "Tokens looked up in the token cache and verified in full",
            self.misses.clone(),
        );
        registry.register(
            "token_cache_evictions",
            "Verified tokens pushed out of the token cache by [auth.limits] token_cache_entries",
            self.evictions.clone(),
        );
        registry.register(
            "token_cache_entries",
            "Verified tokens in the token cache",
            self.entries.clone(),
        );
        registry.register(
            "token_cache_capacity",
            "[auth.limits] token_cache_entries (0: the cache is off)",
            self.capacity.clone(),
        );
    }

    pub fn update(&self, stats: &TokenCacheStats) {
        super::advance(&self.hits, stats.hits);
        super::advance(&self.misses, stats.misses);
        super::advance(&self.evictions, stats.evictions);
        self.entries
            .set(i64::try_from(stats.entries).unwrap_or(i64::MAX));
        self.capacity
            .set(i64::try_from(stats.capacity).unwrap_or(i64::MAX));
    }
}
