//! The grant store: lookups, revocation, and expiry events at the instant.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tcpgate::auth::grants::GrantEvent;
use tcpgate::auth::{
    Decision, Destination, DestinationSpec, GrantId, GrantKind, GrantStore, ValidatedToken,
    Verified,
};
use tokio::sync::broadcast::error::TryRecvError;
use tokio::time::Instant;

use crate::support::*;

fn validated(sub: &str) -> ValidatedToken {
    let claims = claims_with(&[("sub", json!(sub))])
        .as_object()
        .expect("object")
        .clone();
    ValidatedToken {
        issuer: ISSUER.into(),
        subject: sub.into(),
        expires_at: UNIX_EPOCH + Duration::from_secs(claims["exp"].as_u64().expect("exp")),
        claims,
    }
}

/// A verified token as the gate hands it to the store.
fn token(sub: &str) -> std::sync::Arc<Verified> {
    Verified::new(validated(sub))
}

fn decision(now: SystemTime, secs: u64) -> Decision {
    let d = Destination::parse(&DestinationSpec {
        prefix: "192.0.2.0/24".into(),
        ports: vec!["5432".into()],
    })
    .expect("destination");
    Decision {
        rule: "deploy-db".into(),
        expires_at: now + Duration::from_secs(secs),
        destinations: vec![d],
    }
}

fn source(ip: &str) -> GrantKind {
    GrantKind::Source {
        source: ip.parse().expect("ip"),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn audit_store() -> GrantStore {
    GrantStore::new(vec![
        "project_path".into(),
        "job_id".into(),
        "not_in_token".into(),
    ])
}

#[test]
fn audit_claims_are_paths_like_rule_claims() {
    let store = GrantStore::new(vec![
        "aws.role".into(),
        "aws.account".into(),
        "aws.missing".into(),
    ]);
    let mut t = validated("arn:aws:sts::123456789012:assumed-role/ci-deploy/job-1");
    t.claims.insert(
        "aws".into(),
        json!({ "account": "123456789012", "role": "ci-deploy" }),
    );
    let audited = store.audit_claims(&t);
    assert_eq!(
        audited.into_iter().collect::<Vec<_>>(),
        [
            ("aws.account".to_owned(), json!("123456789012")),
            ("aws.role".to_owned(), json!("ci-deploy"))
        ]
    );
}

#[test]
fn covering_finds_live_source_grants_for_allowed_destinations() {
    let store = audit_store();
    let now = SystemTime::now();
    let g = store
        .create(
            source("198.51.100.20"),
            &token("alice"),
            &decision(now, 600),
            now,
        )
        .expect("create");
    assert_eq!(
        g.source(),
        Some("198.51.100.20".parse::<IpAddr>().expect("ip"))
    );
    assert_eq!(
        g.audit_claims.keys().collect::<Vec<_>>(),
        ["job_id", "project_path"]
    );
    assert_eq!(g.audit_claims["project_path"], json!("group/app"));
    let found = store.covering(
        "198.51.100.20".parse().expect("ip"),
        sa("192.0.2.10:5432"),
        now,
    );
    assert_eq!(found.map(|f| f.id), Some(g.id));
    let mapped: IpAddr = "::ffff:198.51.100.20".parse().expect("ip");
    assert!(
        store.covering(mapped, sa("192.0.2.10:5432"), now).is_some(),
        "v4-mapped source"
    );
    assert!(
        store
            .covering(
                "198.51.100.21".parse().expect("ip"),
                sa("192.0.2.10:5432"),
                now
            )
            .is_none()
    );
    assert!(
        store
            .covering(
                "198.51.100.20".parse().expect("ip"),
                sa("192.0.2.10:5433"),
                now
            )
            .is_none()
    );
    let later = now + Duration::from_secs(600);
    assert!(
        store
            .covering(
                "198.51.100.20".parse().expect("ip"),
                sa("192.0.2.10:5432"),
                later
            )
            .is_none()
    );
    // Preamble grants belong to one connection and never cover a source.
    let p = store
        .create(GrantKind::Preamble, &token("bob"), &decision(now, 600), now)
        .expect("create");
    assert_eq!(p.source(), None);
    assert_eq!(store.list().len(), 2);
    let json = serde_json::to_value(&g).expect("json");
    assert_eq!(
        (json["kind"].clone(), json["source"].clone()),
        (json!("source"), json!("198.51.100.20"))
    );
    assert_eq!(json["id"], json!(g.id.to_string()));
}

#[test]
fn ids_are_unique_nonzero_and_round_trip() {
    let store = audit_store();
    let now = SystemTime::now();
    let ids: HashSet<GrantId> = (0..100)
        .map(|_| {
            store
                .create(GrantKind::Preamble, &token("a"), &decision(now, 60), now)
                .expect("create")
                .id
        })
        .collect();
    assert_eq!(ids.len(), 100);
    for id in &ids {
        assert_ne!(id.0, 0);
        assert_eq!(id.to_string().parse::<GrantId>().expect("parse"), *id);
    }
    assert!("0".parse::<GrantId>().is_err());
    assert!("xyz".parse::<GrantId>().is_err());
    assert!("+1".parse::<GrantId>().is_err());
}

#[tokio::test]
async fn revocation_removes_and_notifies() {
    let store = audit_store();
    let mut events = store.subscribe();
    let now = SystemTime::now();
    let a = store
        .create(
            source("198.51.100.1"),
            &token("alice"),
            &decision(now, 600),
            now,
        )
        .expect("create");
    let b = store
        .create(
            source("198.51.100.2"),
            &token("bob"),
            &decision(now, 600),
            now,
        )
        .expect("create");
    let c = store
        .create(GrantKind::Preamble, &token("bob"), &decision(now, 600), now)
        .expect("create");
    assert_eq!(store.revoke(a.id).map(|g| g.id), Some(a.id));
    assert_eq!(store.revoke(a.id), None, "already gone");
    assert_eq!(events.try_recv(), Ok(GrantEvent::Revoked(a.id)));
    let mut gone: Vec<GrantId> = store
        .revoke_subject("bob")
        .into_iter()
        .map(|g| g.id)
        .collect();
    gone.sort();
    let mut want = vec![b.id, c.id];
    want.sort();
    assert_eq!(gone, want);
    let mut got = vec![
        events.try_recv().expect("event"),
        events.try_recv().expect("event"),
    ];
    got.sort_by_key(|e| match e {
        GrantEvent::Revoked(id) | GrantEvent::Expired(id) => *id,
    });
    assert_eq!(
        got,
        want.iter()
            .map(|id| GrantEvent::Revoked(*id))
            .collect::<Vec<_>>()
    );
    assert!(store.is_empty());
    assert!(store.get(b.id).is_none());
}

#[test]
fn remove_expired_uses_the_given_time() {
    let store = audit_store();
    let mut events = store.subscribe();
    let now = SystemTime::now();
    let short = store
        .create(GrantKind::Preamble, &token("a"), &decision(now, 10), now)
        .expect("create");
    let long = store
        .create(GrantKind::Preamble, &token("a"), &decision(now, 20), now)
        .expect("create");
    assert!(
        store
            .remove_expired(now + Duration::from_secs(9))
            .is_empty()
    );
    let gone = store.remove_expired(now + Duration::from_secs(10));
    assert_eq!(gone.iter().map(|g| g.id).collect::<Vec<_>>(), [short.id]);
    assert_eq!(events.try_recv(), Ok(GrantEvent::Expired(short.id)));
    assert_eq!(store.get(long.id).map(|g| g.id), Some(long.id));
}

#[tokio::test(start_paused = true)]
async fn expiry_fires_at_the_expiry_instant() {
    let store = audit_store();
    let mut events = store.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(store.clone().run_expiry(async {
        let _ = stopped.await;
    }));
    let start = Instant::now();
    let now = SystemTime::now();
    let g = store
        .create(
            source("198.51.100.5"),
            &token("alice"),
            &decision(now, 10),
            now,
        )
        .expect("create");
    tokio::time::sleep(Duration::from_millis(9_999)).await;
    assert_eq!(
        events.try_recv(),
        Err(TryRecvError::Empty),
        "nothing before the deadline"
    );
    assert!(store.get(g.id).is_some());
    let ev = events.recv().await.expect("expiry event");
    assert_eq!(ev, GrantEvent::Expired(g.id));
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(10),
        "woke at the instant, not on a tick"
    );
    assert!(store.get(g.id).is_none());
    let _ = stop.send(());
    task.await.expect("expiry task stops on shutdown");
}

#[tokio::test(start_paused = true)]
async fn an_earlier_grant_rearms_the_sleeping_expiry_task() {
    let store = audit_store();
    let mut events = store.subscribe();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(store.clone().run_expiry(async {
        let _ = stopped.await;
    }));
    let start = Instant::now();
    let now = SystemTime::now();
    let late = store
        .create(GrantKind::Preamble, &token("a"), &decision(now, 60), now)
        .expect("create");
    // Let the task go to sleep on the 60 s deadline first.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let early = store
        .create(GrantKind::Preamble, &token("a"), &decision(now, 5), now)
        .expect("create");
    assert_eq!(
        events.recv().await.expect("event"),
        GrantEvent::Expired(early.id)
    );
    assert_eq!(start.elapsed(), Duration::from_millis(5_001));
    assert_eq!(
        events.recv().await.expect("event"),
        GrantEvent::Expired(late.id)
    );
    assert_eq!(start.elapsed(), Duration::from_secs(60));
    // Revoking does not produce a late expiry event.
    let gone = store
        .create(
            GrantKind::Preamble,
            &token("a"),
            &decision(SystemTime::now(), 3),
            SystemTime::now(),
        )
        .expect("create");
    store.revoke(gone.id);
    assert_eq!(
        events.recv().await.expect("event"),
        GrantEvent::Revoked(gone.id)
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
    task.abort();
}

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
