//! Verified tokens by their SHA-256, so that a CI job's many connections
//! with the same token pay one signature check.
//!
//! An entry lives until its token's `exp` at the latest. The whole cache is
//! dropped when the keys it was verified with may have changed (a JWKS
//! refresh that brought a different key set) or when anything was revoked:
//! a cached answer never outlives the facts it was computed from. The
//! revocation check itself still runs on every connection, after the
//! cache; clearing on revocation only keeps the cache from holding tokens
//! that can no longer be used. Bounded by `[auth.limits]
//! token_cache_entries`; when full, expired entries go first, then the one
//! that expires soonest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use super::claims_memo::Verified;
#[cfg(test)]
use super::token::ValidatedToken;

/// A token's SHA-256: the cache never holds the token itself.
pub type TokenDigest = [u8; 32];

/// What the cached answers depend on: the issuers' key sets and the
/// revocations, each as a counter that moves whenever they change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamp {
    pub keys: u64,
    pub revocations: u64,
}

impl Stamp {
    /// Whether `self` was taken at or after `other` (both counters only grow).
    fn not_older_than(self, other: Stamp) -> bool {
        self.keys >= other.keys && self.revocations >= other.revocations
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenCacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries pushed out by the bound (not by expiry or a clear).
    pub evictions: u64,
    pub entries: usize,
    pub capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    stamp: Stamp,
    /// Shared with the connections the token admitted, memo included.
    entries: HashMap<TokenDigest, Arc<Verified>>,
}

/// Verified tokens, bounded; `capacity` 0 turns the cache off.
#[derive(Debug)]
pub struct TokenCache {
    capacity: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

/// The key a token is cached under (the same trimming as validation).
#[must_use]
pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.trim().as_bytes()).into()
}

impl TokenCache {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The verified token for `digest`, if it was verified under `stamp`
    /// and has not expired by `now`. A newer stamp drops every entry.
    pub fn get(
        &self,
        digest: &TokenDigest,
        stamp: Stamp,
        now: SystemTime,
    ) -> Option<Arc<Verified>> {
        if self.capacity == 0 {
            return None;
        }
        let found = {
            let mut inner = self.inner();
            adopt(&mut inner, stamp);
            match inner.entries.get(digest) {
                Some(token) if inner.stamp == stamp && token.expires_at > now => {
                    Some(Arc::clone(token))
                }
                Some(_) if inner.stamp == stamp => {
                    inner.entries.remove(digest);
                    None
                }
                _ => None,
            }
        };
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `token`, verified under `stamp`, until its `exp`. Dropped when
    /// the stamp is already stale (a key change or revocation happened
    /// while it was being verified) or the token has expired.
    pub fn insert(
        &self,
        digest: TokenDigest,
        token: &Arc<Verified>,
        stamp: Stamp,
        now: SystemTime,
    ) {
        if self.capacity == 0 || token.expires_at <= now {
            return;
        }
        let mut inner = self.inner();
        adopt(&mut inner, stamp);
        if inner.stamp != stamp {
            return;
        }
        if inner.entries.len() >= self.capacity && !inner.entries.contains_key(&digest) {
            inner.entries.retain(|_, t| t.expires_at > now);
            if inner.entries.len() >= self.capacity {
                let soonest = inner
                    .entries
                    .iter()
                    .min_by_key(|(_, t)| t.expires_at)
                    .map(|(d, _)| *d);
                if let Some(soonest) = soonest {
                    inner.entries.remove(&soonest);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        inner.entries.insert(digest, Arc::clone(token));
    }

    /// Drops every entry (e.g. a revocation).
    pub fn clear(&self) {
        self.inner().entries.clear();
    }

    #[must_use]
    pub fn stats(&self) -> TokenCacheStats {
        TokenCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries: self.inner().entries.len(),
            capacity: self.capacity,
        }
    }
}

/// Moves the cache to `stamp` when it is newer, dropping what was verified
/// under the old one.
fn adopt(inner: &mut Inner, stamp: Stamp) {
    if stamp != inner.stamp && stamp.not_older_than(inner.stamp) {
        inner.entries.clear();
        inner.stamp = stamp;
    }
}

#[cfg(test)]
#[path = "token_cache_tests.rs"]
mod tests;
