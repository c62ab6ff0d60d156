//! JWKS served over HTTPS on loopback by a server whose certificate comes
//! from a private CA (given to the agent as `ca_file`).

use std::time::Duration;

use jsonwebtoken::Algorithm;
use tcpgate::auth::TokenValidator;
use tcpgate::auth::jwks::JwksStatsSnapshot;

use crate::support::*;
use crate::test_server::TestServer;

async fn https_validator(server: &TestServer, min_refresh: &str, with_ca: bool) -> TokenValidator {
    let ca = if with_ca {
        format!("ca_file = {:?}\n", key_files().ca_pem)
    } else {
        String::new()
    };
    validator(&format!(
        "[[issuer]]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\n\
         jwks_url = \"https://127.0.0.1:{}/oauth/discovery/keys\"\n{ca}min_refresh_interval = \"{min_refresh}\"\n",
        server.addr.port()
    ))
    .await
}

fn stats(v: &TokenValidator) -> JwksStatsSnapshot {
    v.jwks_stats()
        .into_iter()
        .find(|(i, _)| i == ISSUER)
        .expect("issuer stats")
        .1
}

#[tokio::test]
async fn unknown_kid_triggers_exactly_one_rate_limited_refresh() {
    let a = TestKey::new("key-a", Algorithm::RS256);
    let server = TestServer::start(true, 200, &jwks(&[&a])).await;
    let v = https_validator(&server, "30s", true).await;
    assert_eq!(server.hits(), 1, "initial load");
    assert!(v.validate(&a.sign(&gitlab_claims())).await.is_ok());
    assert_eq!(server.hits(), 1, "a known kid needs no fetch");

    let ghost = TestKey::rsa2("key-ghost");
    let token = ghost.sign(&gitlab_claims());
    // Concurrent misses share one refresh.
    let (r1, r2, r3) = tokio::join!(v.validate(&token), v.validate(&token), v.validate(&token));
    for r in [r1, r2, r3] {
        assert_eq!(r.err().map(|e| e.reason()), Some("unknown_kid"));
    }
    assert_eq!(server.hits(), 2, "one refresh for all concurrent misses");
    // Within the minimum interval, further misses do not fetch.
    for _ in 0..3 {
        assert_eq!(
            v.validate(&token).await.err().map(|e| e.reason()),
            Some("unknown_kid")
        );
    }
    assert_eq!(server.hits(), 2);
    let s = stats(&v);
    assert_eq!(
        (
            s.refresh_attempts,
            s.refresh_failures,
            s.refresh_rate_limited
        ),
        (1, 0, 3)
    );
}

#[tokio::test]
async fn rotated_key_is_picked_up_and_old_key_keeps_working() {
    let old = TestKey::new("2024-key", Algorithm::RS256);
    let new = TestKey::rsa2("2025-key");
    let server = TestServer::start(true, 200, &jwks(&[&old])).await;
    let v = https_validator(&server, "30s", true).await;
    server.set_reply(200, &jwks(&[&old, &new]));
    let ok = v
        .validate(&new.sign(&gitlab_claims()))
        .await
        .expect("new kid after refresh");
    assert_eq!(ok.issuer, ISSUER);
    assert_eq!(server.hits(), 2);
    assert!(
        v.validate(&old.sign(&gitlab_claims())).await.is_ok(),
        "old kid still served"
    );
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn last_good_keys_survive_failed_refreshes() {
    let a = TestKey::new("key-a", Algorithm::ES256);
    let server = TestServer::start(true, 200, &jwks(&[&a])).await;
    // A 1 ms minimum interval lets each miss below fetch again.
    let v = https_validator(&server, "1ms", true).await;
    let good = a.sign(&gitlab_claims());
    let unknown = TestKey::rsa2("unknown").sign(&gitlab_claims());
    let bad_answers = [
        (500, "internal error".to_owned()),
        (200, "this is not json".to_owned()),
        (200, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.to_owned()),
    ];
    for (i, (status, body)) in bad_answers.iter().enumerate() {
        server.set_reply(*status, body);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            v.validate(&unknown).await.err().map(|e| e.reason()),
            Some("unknown_kid")
        );
        assert_eq!(server.hits(), 2 + i, "the miss fetched");
        assert!(
            v.validate(&good).await.is_ok(),
            "last good keys kept after {status} {body}"
        );
    }
    let s = stats(&v);
    assert_eq!((s.refresh_attempts, s.refresh_failures), (3, 3));
}

#[tokio::test]
async fn keys_are_refreshed_periodically() {
    let a = TestKey::new("key-a", Algorithm::EdDSA);
    let b = TestKey::rsa2("key-b");
    let server = TestServer::start(true, 200, &jwks(&[&a])).await;
    let v = validator(&format!(
        "[[issuer]]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\n\
         jwks_url = \"https://127.0.0.1:{}/keys\"\nca_file = {:?}\nrefresh_interval = \"20ms\"\n\
         min_refresh_interval = \"1h\"\n",
        server.addr.port(),
        key_files().ca_pem
    ))
    .await;
    server.set_reply(200, &jwks(&[&b]));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(v.clone().run_refresh(async {
        let _ = stopped.await;
    }));
    // Bounded wait for the periodic task to fetch the new set.
    let mut fetched = false;
    for _ in 0..500 {
        if server.hits() >= 2 && stats(&v).refresh_attempts >= 1 {
            fetched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(fetched, "periodic refresh never ran");
    // Wait until the swap is visible, then the new key validates without an
    // on-demand fetch (that would be rate-limited by the 1h minimum anyway).
    let token = b.sign(&gitlab_claims());
    let mut ok = false;
    for _ in 0..500 {
        if v.validate(&token).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "periodically fetched key never became usable");
    let _ = stop.send(());
    task.await.expect("refresh task ends on shutdown");
}

#[tokio::test]
async fn a_server_certificate_from_an_untrusted_ca_is_refused() {
    let a = TestKey::new("key-a", Algorithm::ES256);
    let server = TestServer::start(true, 200, &jwks(&[&a])).await;
    // Without ca_file the private CA is unknown: the startup fetch fails, the
    // validator starts with no keys and rejects every token.
    let v = https_validator(&server, "30s", false).await;
    assert_eq!(server.hits(), 0, "TLS must fail before any request is read");
    assert_eq!(
        v.validate(&a.sign(&gitlab_claims()))
            .await
            .err()
            .map(|e| e.reason()),
        Some("unknown_kid")
    );
    let s = stats(&v);
    assert_eq!((s.refresh_attempts, s.refresh_failures), (1, 1));
}
