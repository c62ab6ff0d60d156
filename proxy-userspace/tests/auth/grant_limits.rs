//! The grant store's bounds and revocations: each cap holds and frees
//! with its grants, and a revoked subject or grant stays refused.

use std::time::{Duration, SystemTime};

use serde_json::json;
use tcpgate::auth::{GrantKind, GrantStore, Verified};

use crate::grants::{audit_store, decision, source, token, validated};

fn capped(per_subject: usize, per_source: usize, total: usize) -> GrantStore {
    let limits = tcpgate::auth::limits::AuthLimits {
        grants_per_subject: per_subject,
        grants_per_source: per_source,
        max_grants: total,
        ..Default::default()
    };
    GrantStore::with_limits(vec![], limits)
}

#[test]
fn each_grant_cap_holds_and_frees_with_its_grants() {
    use tcpgate::auth::{CreateError, GrantLimit};
    let now = SystemTime::now();
    let d = decision(now, 600);
    // Per identity: a third grant for alice is refused, bob still gets one.
    let store = capped(2, 100, 100);
    let a1 = store.create(source("198.51.100.1"), &token("alice"), &d, now);
    store
        .create(source("198.51.100.2"), &token("alice"), &d, now)
        .expect("second");
    assert_eq!(
        store.create(source("198.51.100.3"), &token("alice"), &d, now),
        Err(CreateError::Limit(GrantLimit::PerSubject))
    );
    store
        .create(source("198.51.100.3"), &token("bob"), &d, now)
        .expect("another subject");
    // Preamble grants (one per session) are not source grants.
    store
        .create(GrantKind::Preamble, &token("alice"), &d, now)
        .expect("preamble");
    store.give_back(a1.expect("first").id);
    store
        .create(source("198.51.100.3"), &token("alice"), &d, now)
        .expect("room again after a grant ended");
    // Per source.
    let store = capped(100, 2, 100);
    for who in ["a", "b"] {
        store
            .create(source("198.51.100.9"), &token(who), &d, now)
            .expect("under the cap");
    }
    assert_eq!(
        store.create(source("::ffff:198.51.100.9"), &token("c"), &d, now),
        Err(CreateError::Limit(GrantLimit::PerSource))
    );
    // In total.
    let store = capped(100, 100, 3);
    for i in 1..=3 {
        store
            .create(source(&format!("198.51.100.{i}")), &token("a"), &d, now)
            .expect("under the cap");
    }
    assert_eq!(
        store.create(source("198.51.100.4"), &token("b"), &d, now),
        Err(CreateError::Limit(GrantLimit::Total))
    );
    store.remove_expired(now + Duration::from_secs(600));
    store
        .create(source("198.51.100.4"), &token("b"), &d, now)
        .expect("room after expiry");
}

#[test]
fn revoking_a_subject_sticks_for_its_tokens_and_spares_others() {
    let store = audit_store();
    let now = SystemTime::now();
    let d = decision(now, 600);
    let alice = token("alice");
    store
        .create(source("198.51.100.1"), &alice, &d, now)
        .expect("grant");
    assert_eq!(store.revoke_subject("alice").len(), 1);
    assert!(store.refuses(&alice, SystemTime::now()));
    assert_eq!(
        store.create(source("198.51.100.1"), &alice, &d, SystemTime::now()),
        Err(tcpgate::auth::CreateError::Revoked)
    );
    assert!(!store.refuses(&token("bob"), SystemTime::now()));
    assert!(
        !store.refuses(&alice, alice.expires_at),
        "the hold ends with the token's exp"
    );
}

#[test]
fn revoking_one_grant_denies_its_token_by_jti_only() {
    let store = audit_store();
    let now = SystemTime::now();
    let d = decision(now, 600);
    let mut first = validated("carol");
    first.claims.insert("jti".into(), json!("jti-1"));
    let first = Verified::new(first);
    let mut second = validated("carol");
    second.claims.insert("jti".into(), json!("jti-2"));
    let second = Verified::new(second);
    let g = store
        .create(source("198.51.100.1"), &first, &d, now)
        .expect("grant");
    store.revoke(g.id);
    assert!(store.refuses(&first, SystemTime::now()), "the same token");
    assert!(!store.refuses(&second, SystemTime::now()), "another token");
    // Giving a grant back is not a revocation.
    let g = store
        .create(source("198.51.100.1"), &second, &d, now)
        .expect("grant");
    store.give_back(g.id);
    assert!(!store.refuses(&second, SystemTime::now()));
}

#[test]
fn revoking_a_subject_never_seen_still_refuses_its_tokens() {
    let store = audit_store();
    assert!(store.revoke_subject("dave").is_empty());
    assert!(store.refuses(&token("dave"), SystemTime::now()));
    assert!(!store.refuses(&token("erin"), SystemTime::now()));
}
