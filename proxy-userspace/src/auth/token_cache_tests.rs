use std::time::{Duration, SystemTime};

use serde_json::Map;

use super::*;

fn token(subject: &str, expires_at: SystemTime) -> Arc<Verified> {
    Verified::new(ValidatedToken {
        issuer: "https://gitlab.example".to_owned(),
        subject: subject.to_owned(),
        expires_at,
        claims: Map::new(),
    })
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
}

const S0: Stamp = Stamp {
    keys: 0,
    revocations: 0,
};

#[test]
fn a_verified_token_is_a_hit_until_its_exp() {
    let cache = TokenCache::new(8);
    let d = digest("aaa.bbb.ccc");
    assert_eq!(cache.get(&d, S0, at(0)), None, "empty");
    cache.insert(d, &token("job", at(60)), S0, at(0));
    assert_eq!(
        cache.get(&d, S0, at(59)).map(|t| t.subject.clone()),
        Some("job".to_owned())
    );
    assert_eq!(cache.get(&d, S0, at(60)), None, "expired at its exp");
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.entries), (1, 2, 0));
}

#[test]
fn the_digest_is_of_the_trimmed_token_and_tells_tokens_apart() {
    assert_eq!(digest(" aaa.bbb.ccc\n"), digest("aaa.bbb.ccc"));
    assert_ne!(digest("aaa.bbb.ccc"), digest("aaa.bbb.ccd"));
}

#[test]
fn an_expired_token_is_never_kept() {
    let cache = TokenCache::new(8);
    let d = digest("t");
    cache.insert(d, &token("job", at(10)), S0, at(10));
    assert_eq!(cache.stats().entries, 0);
}

#[test]
fn a_revocation_clears_it() {
    let cache = TokenCache::new(8);
    let d = digest("t");
    cache.insert(d, &token("job", at(60)), S0, at(0));
    let revoked = Stamp {
        revocations: 1,
        ..S0
    };
    assert_eq!(cache.get(&d, revoked, at(1)), None);
    assert_eq!(cache.stats().entries, 0);
    // An answer computed before the revocation is not kept after it.
    cache.insert(d, &token("job", at(60)), S0, at(1));
    assert_eq!(cache.stats().entries, 0);
    assert_eq!(cache.get(&d, revoked, at(1)), None);
}

#[test]
fn a_key_rotation_clears_it() {
    let cache = TokenCache::new(8);
    let (a, b) = (digest("a"), digest("b"));
    cache.insert(a, &token("one", at(60)), S0, at(0));
    cache.insert(b, &token("two", at(60)), S0, at(0));
    let rotated = Stamp { keys: 1, ..S0 };
    // The first look under the new key set drops every entry.
    assert_eq!(cache.get(&a, rotated, at(1)), None);
    assert_eq!(cache.get(&b, rotated, at(1)), None);
    assert_eq!(cache.stats().entries, 0);
    cache.insert(a, &token("one", at(60)), rotated, at(1));
    assert!(cache.get(&a, rotated, at(2)).is_some());
    // A lookup that read the old key set's counter finds nothing.
    assert_eq!(cache.get(&a, S0, at(2)), None);
}

#[test]
fn the_bound_evicts_expired_entries_first_then_the_soonest_to_expire() {
    let cache = TokenCache::new(2);
    let (a, b, c, d) = (digest("a"), digest("b"), digest("c"), digest("d"));
    cache.insert(a, &token("a", at(10)), S0, at(0));
    cache.insert(b, &token("b", at(100)), S0, at(0));
    // At 20, `a` has expired: it makes room without an eviction.
    cache.insert(c, &token("c", at(50)), S0, at(20));
    assert_eq!((cache.stats().entries, cache.stats().evictions), (2, 0));
    // Full with live entries: `c` expires first and goes.
    cache.insert(d, &token("d", at(200)), S0, at(21));
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.evictions, stats.capacity), (2, 1, 2));
    assert!(cache.get(&c, S0, at(22)).is_none());
    assert!(cache.get(&b, S0, at(22)).is_some());
    assert!(cache.get(&d, S0, at(22)).is_some());
}

#[test]
fn capacity_zero_turns_it_off() {
    let cache = TokenCache::new(0);
    let d = digest("t");
    cache.insert(d, &token("job", at(60)), S0, at(0));
    assert_eq!(cache.get(&d, S0, at(1)), None);
    assert_eq!(cache.stats(), TokenCacheStats::default());
}
