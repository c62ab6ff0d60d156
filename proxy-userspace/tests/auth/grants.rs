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

pub(crate) fn validated(sub: &str) -> ValidatedToken {
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
pub(crate) fn token(sub: &str) -> std::sync::Arc<Verified> {
    Verified::new(validated(sub))
}

pub(crate) fn decision(now: SystemTime, secs: u64) -> Decision {
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

pub(crate) fn source(ip: &str) -> GrantKind {
    GrantKind::Source {
        source: ip.parse().expect("ip"),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

pub(crate) fn audit_store() -> GrantStore {
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
