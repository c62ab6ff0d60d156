//! OIDC discovery: keys found through the issuer's
//! `/.well-known/openid-configuration`, followed on refresh, and refused
//! when the document names another issuer.

use jsonwebtoken::Algorithm;
use serde_json::json;
use tcpgate::auth::TokenValidator;

use crate::support::*;
use crate::test_server::TestServer;

const WELL_KNOWN: &str = "/.well-known/openid-configuration";

/// A loopback issuer whose discovery document points at `/keys`.
async fn issuer_server(keys: &[&TestKey]) -> (TestServer, String) {
    let server = TestServer::start(true, 404, "{}").await;
    let issuer = format!("https://127.0.0.1:{}", server.addr.port());
    server.set_route(
        WELL_KNOWN,
        200,
        &metadata(&issuer, &format!("{issuer}/keys")),
    );
    server.set_route("/keys", 200, &jwks(keys));
    (server, issuer)
}

fn metadata(issuer: &str, jwks_uri: &str) -> String {
    json!({
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })
    .to_string()
}

async fn discovering_validator(issuer: &str, extra: &str) -> TokenValidator {
    validator(&format!(
        "[[issuer]]\nissuer = {issuer:?}\naudience = \"{AUDIENCE}\"\nca_file = {:?}\n\
         min_refresh_interval = \"1ms\"\n{extra}",
        key_files().ca_pem
    ))
    .await
}

fn claims_from(issuer: &str) -> serde_json::Value {
    claims_with(&[("iss", json!(issuer))])
}

#[tokio::test]
async fn discovery_finds_the_keys_and_follows_rotation() {
    let a = TestKey::new("key-a", Algorithm::RS256);
    let (server, issuer) = issuer_server(&[&a]).await;
    let v = discovering_validator(&issuer, "").await;
    assert_eq!(server.paths(), [WELL_KNOWN, "/keys"]);
    let t = v
        .validate(&a.sign(&claims_from(&issuer)))
        .await
        .expect("valid");
    assert_eq!(t.issuer, issuer);

    // Rotation in place: a new key at the same jwks_uri.
    let b = TestKey::rsa2("key-b");
    server.set_route("/keys", 200, &jwks(&[&b]));
    v.validate(&b.sign(&claims_from(&issuer)))
        .await
        .expect("rotated key");
    assert_eq!(server.paths()[2..], [WELL_KNOWN, "/keys"], "both refetched");

    // Rotation by moving the JWKS: the document is read again and followed.
    let c = TestKey::new("key-c", Algorithm::ES256);
    server.set_route("/keys-2026", 200, &jwks(&[&c]));
    server.set_route(
        WELL_KNOWN,
        200,
        &metadata(&issuer, &format!("{issuer}/keys-2026")),
    );
    v.validate(&c.sign(&claims_from(&issuer)))
        .await
        .expect("moved jwks_uri");
    assert_eq!(server.paths()[4..], [WELL_KNOWN, "/keys-2026"]);
    // The retired key is gone with its document.
    let err = v
        .validate(&a.sign(&claims_from(&issuer)))
        .await
        .expect_err("retired");
    assert_eq!(err.reason(), "unknown_kid");
}

#[tokio::test]
async fn a_document_for_another_issuer_is_refused_with_a_clear_error() {
    let a = TestKey::new("key-a", Algorithm::RS256);
    let (server, issuer) = issuer_server(&[&a]).await;
    server.set_route(
        WELL_KNOWN,
        200,
        &metadata("https://evil.example.com", &format!("{issuer}/keys")),
    );
    let v = discovering_validator(&issuer, "").await;
    // Neither at startup nor on the unknown-kid refresh are its keys fetched.
    let err = v
        .validate(&a.sign(&claims_from(&issuer)))
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), "unknown_kid");
    assert!(
        !server.paths().iter().any(|p| p == "/keys"),
        "{:?}",
        server.paths()
    );
    let problem = v.key_problem(&issuer).expect("the refusal is kept");
    assert!(
        problem.contains(&format!(
            "names issuer \"https://evil.example.com\", not the configured \"{issuer}\": refusing its keys"
        )),
        "{problem}"
    );
    // A trailing slash is another issuer too: the match is exact.
    server.set_route(
        WELL_KNOWN,
        200,
        &metadata(&format!("{issuer}/"), &format!("{issuer}/keys")),
    );
    let err = v
        .validate(&a.sign(&claims_from(&issuer)))
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), "unknown_kid");
    // Once the document is right, the same validator takes its keys.
    server.set_route(
        WELL_KNOWN,
        200,
        &metadata(&issuer, &format!("{issuer}/keys")),
    );
    v.validate(&a.sign(&claims_from(&issuer)))
        .await
        .expect("fixed");
    assert_eq!(v.key_problem(&issuer), None);
}

#[tokio::test]
async fn a_later_mismatch_keeps_the_last_good_keys_and_takes_none_of_its_own() {
    let a = TestKey::new("key-a", Algorithm::RS256);
    let (server, issuer) = issuer_server(&[&a]).await;
    let v = discovering_validator(&issuer, "").await;
    let b = TestKey::rsa2("key-b");
    server.set_route("/keys", 200, &jwks(&[&a, &b]));
    server.set_route(
        WELL_KNOWN,
        200,
        &metadata("https://evil.example.com", &format!("{issuer}/keys")),
    );
    let err = v
        .validate(&b.sign(&claims_from(&issuer)))
        .await
        .expect_err("b not taken");
    assert_eq!(err.reason(), "unknown_kid");
    v.validate(&a.sign(&claims_from(&issuer)))
        .await
        .expect("a still good");
}

#[tokio::test]
async fn an_explicit_jwks_url_wins_over_discovery() {
    let a = TestKey::new("key-a", Algorithm::RS256);
    let (server, issuer) = issuer_server(&[&a]).await;
    let v = discovering_validator(&issuer, &format!("jwks_url = \"{issuer}/keys\"\n")).await;
    v.validate(&a.sign(&claims_from(&issuer)))
        .await
        .expect("valid");
    assert_eq!(server.paths(), ["/keys"]);
}
