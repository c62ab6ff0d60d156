//! Token validation with real keys of every supported algorithm, served
//! from a JWKS file.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};
use tcpgate::auth::{TokenError, TokenValidator};

use crate::support::*;

fn all_keys() -> Vec<TestKey> {
    vec![
        TestKey::new("rsa-rs256", Algorithm::RS256),
        TestKey::new("rsa-rs384", Algorithm::RS384),
        TestKey::new("rsa-rs512", Algorithm::RS512),
        TestKey::new("rsa-ps256", Algorithm::PS256),
        TestKey::new("ec-p256", Algorithm::ES256),
        TestKey::new("ec-p384", Algorithm::ES384),
        TestKey::new("ed25519", Algorithm::EdDSA),
    ]
}

/// A validator for ISSUER whose JWKS file holds `keys`; `extra` is appended
/// to the issuer table.
async fn file_validator(keys: &[TestKey], extra: &str) -> (tempfile::TempDir, TokenValidator) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&keys.iter().collect::<Vec<_>>())).expect("write jwks");
    let v = validator(&format!(
        "leeway = \"30s\"\n[[issuer]]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_file = {path:?}\n{extra}"
    ))
    .await;
    (dir, v)
}

async fn reject(v: &TokenValidator, token: &str) -> TokenError {
    v.validate(token).await.expect_err("token must be rejected")
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn every_algorithm_validates_a_gitlab_token() {
    let keys = all_keys();
    let (_dir, v) = file_validator(&keys, "").await;
    let claims = gitlab_claims();
    for key in &keys {
        let token = key.sign(&claims);
        let ok = v
            .validate(&token)
            .await
            .unwrap_or_else(|e| panic!("{:?} rejected: {e}", key.alg));
        assert_eq!(ok.issuer, ISSUER);
        assert_eq!(
            ok.subject,
            "project_path:group/app:ref_type:branch:ref:release/1.4"
        );
        let exp = claims["exp"].as_u64().expect("exp");
        assert_eq!(
            ok.expires_at,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp)
        );
        assert_eq!(ok.claims["ref_protected"], json!("true"));
        assert_eq!(ok.claims["runner_id"], json!(31));
        assert_eq!(
            Value::Object(ok.claims),
            claims,
            "all GitLab claims are kept"
        );
    }
}

#[tokio::test]
async fn time_claims_are_checked_with_leeway() {
    let key = TestKey::new("ec-p256", Algorithm::ES256);
    let (_dir, v) = file_validator(std::slice::from_ref(&key), "").await;
    let now = unix_now();
    let expired = key.sign(&claims_with(&[
        ("exp", json!(now - 3600)),
        ("nbf", json!(now - 7200)),
    ]));
    assert_eq!(reject(&v, &expired).await, TokenError::Expired);
    assert_eq!(TokenError::Expired.reason(), "token_expired");
    // Ten seconds late is inside the 30 s leeway.
    let barely = key.sign(&claims_with(&[
        ("exp", json!(now - 10)),
        ("nbf", json!(now - 600)),
    ]));
    assert!(v.validate(&barely).await.is_ok());
    let future = key.sign(&claims_with(&[
        ("nbf", json!(now + 3600)),
        ("exp", json!(now + 7200)),
    ]));
    let e = reject(&v, &future).await;
    assert_eq!(
        (e.reason(), e),
        ("token_not_yet_valid", TokenError::NotYetValid)
    );
    let no_exp = key.sign(&claims_with(&[("exp", Value::Null)]));
    let e = reject(&v, &no_exp).await;
    assert_eq!((e.reason(), e), ("missing_exp", TokenError::MissingExp));
}

#[tokio::test]
async fn issuer_and_audience_are_checked() {
    let key = TestKey::new("ed25519", Algorithm::EdDSA);
    let (_dir, v) = file_validator(std::slice::from_ref(&key), "").await;
    let e = reject(
        &v,
        &key.sign(&claims_with(&[("iss", json!("https://evil.example.com"))])),
    )
    .await;
    assert_eq!(e.reason(), "wrong_issuer");
    let e = reject(
        &v,
        &key.sign(&claims_with(&[("aud", json!("another-service"))])),
    )
    .await;
    assert_eq!(
        (e.reason(), e),
        ("wrong_audience", TokenError::WrongAudience(AUDIENCE.into()))
    );
    assert_eq!(
        reject(&v, &key.sign(&claims_with(&[("aud", Value::Null)])))
            .await
            .reason(),
        "wrong_audience"
    );
    let multi = key.sign(&claims_with(&[(
        "aud",
        json!(["another-service", AUDIENCE]),
    )]));
    assert!(
        v.validate(&multi).await.is_ok(),
        "the audience may be one of several"
    );
}

#[tokio::test]
async fn tampered_tokens_fail_the_signature_check() {
    let key = TestKey::new("rsa-rs256", Algorithm::RS256);
    let (_dir, v) = file_validator(std::slice::from_ref(&key), "").await;
    let token = key.sign(&gitlab_claims());
    let parts: Vec<&str> = token.split('.').collect();
    let forged_payload = b64(&claims_with(&[("project_path", json!("group/other"))]));
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    let e = reject(&v, &tampered).await;
    assert_eq!((e.reason(), e), ("bad_signature", TokenError::BadSignature));
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("signature b64");
    sig[0] ^= 0x01;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    assert_eq!(reject(&v, &flipped).await, TokenError::BadSignature);
}

#[tokio::test]
async fn alg_none_is_always_rejected() {
    let key = TestKey::new("rsa-rs256", Algorithm::RS256);
    let (_dir, v) = file_validator(std::slice::from_ref(&key), "").await;
    for alg in ["none", "None", "NONE"] {
        let header = json!({ "alg": alg, "typ": "JWT", "kid": "rsa-rs256" });
        let token = format!("{}.{}.", b64(&header), b64(&gitlab_claims()));
        let e = reject(&v, &token).await;
        assert_eq!(
            (e.reason(), e),
            ("alg_not_allowed", TokenError::AlgNotAllowed("none".into()))
        );
    }
}

/// The classic key confusion: an attacker takes the issuer's published RSA
/// public key (PEM) and uses it as an HMAC secret.
#[tokio::test]
async fn hs256_forged_with_the_rsa_public_key_is_rejected() {
    let key = TestKey::new("rsa-rs256", Algorithm::RS256);
    let (_dir, v) = file_validator(std::slice::from_ref(&key), "").await;
    let public_pem = &key_files().rsa_public;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-rs256".into());
    let forged = jsonwebtoken::encode(
        &header,
        &gitlab_claims(),
        &EncodingKey::from_secret(public_pem),
    )
    .expect("forge");
    // The forgery is a genuine HS256 token under that secret...
    let mut check = Validation::new(Algorithm::HS256);
    check.set_audience(&[AUDIENCE]);
    assert!(
        jsonwebtoken::decode::<Value>(&forged, &DecodingKey::from_secret(public_pem), &check)
            .is_ok()
    );
    // ...and the agent refuses it.
    let e = reject(&v, &forged).await;
    assert_eq!(e.reason(), "alg_not_allowed", "{e}");
}

#[tokio::test]
async fn header_alg_must_equal_the_key_alg() {
    let rs256 = TestKey::new("rsa-rs256", Algorithm::RS256);
    let (_dir, v) = file_validator(std::slice::from_ref(&rs256), "").await;
    // Same RSA key, valid RS384/PS256 signatures, but the key is RS256 only.
    for alg in [Algorithm::RS384, Algorithm::PS256] {
        let e = reject(&v, &rs256.sign_as(alg, &gitlab_claims())).await;
        assert_eq!(e.reason(), "alg_not_allowed", "{alg:?}: {e}");
    }
    let mut es = TestKey::new("ec-p256", Algorithm::ES256);
    es.kid = "rsa-rs256".into();
    assert_eq!(
        reject(&v, &es.sign(&gitlab_claims())).await.reason(),
        "alg_not_allowed"
    );
}

#[tokio::test]
async fn unknown_kid_and_malformed_tokens_have_specific_errors() {
    let key = TestKey::new("ec-p384", Algorithm::ES384);
    let (_dir, v) = file_validator(std::slice::from_ref(&key), "").await;
    let mut stranger = TestKey::new("ec-p384", Algorithm::ES384);
    stranger.kid = "not-published".into();
    let e = reject(&v, &stranger.sign(&gitlab_claims())).await;
    assert_eq!(e.reason(), "unknown_kid");
    assert!(e.to_string().contains("not-published"), "{e}");
    let good = key.sign(&gitlab_claims());
    let (h, p) = good.split_once('.').expect("dot");
    let cases = [
        "".to_owned(),
        "abc".to_owned(),
        "a.b".to_owned(),
        format!("{good}.extra"),
        format!("!!!.{p}"),
        format!("{}.{p}", b64(&json!("just a string"))),
        format!("{h}.{}.c2ln", URL_SAFE_NO_PAD.encode("not json")),
        format!(
            "{}.{}.c2ln",
            b64(&json!({"alg": "ES384", "kid": "ec-p384"})),
            b64(&claims_with(&[("iss", Value::Null)]))
        ),
        format!(
            "{}.{}.c2ln",
            b64(&json!({"alg": "ES384", "crit": ["exp"]})),
            b64(&gitlab_claims())
        ),
    ];
    for token in cases {
        let e = reject(&v, &token).await;
        assert_eq!(e.reason(), "malformed_token", "{token}: {e}");
    }
    let e = reject(
        &v,
        &format!(
            "{}.{}.c2ln",
            b64(&json!({"alg": "XS999"})),
            b64(&gitlab_claims())
        ),
    )
    .await;
    assert_eq!(e.reason(), "alg_not_allowed");
}

#[tokio::test]
async fn issuer_is_chosen_by_the_iss_claim() {
    let a = TestKey::new("key-a", Algorithm::ES256);
    let b = TestKey::new("key-b", Algorithm::EdDSA);
    let dir = tempfile::tempdir().expect("tempdir");
    let (fa, fb) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(&fa, jwks(&[&a])).expect("write");
    std::fs::write(&fb, jwks(&[&b])).expect("write");
    let other = "https://gitlab.other.example";
    let v = validator(&format!(
        "[[issuer]]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_file = {fa:?}\n\
         [[issuer]]\nissuer = \"{other}\"\naudience = \"bastion\"\njwks_file = {fb:?}\n"
    ))
    .await;
    assert_eq!(
        v.validate(&a.sign(&gitlab_claims()))
            .await
            .expect("issuer a")
            .issuer,
        ISSUER
    );
    let for_b = claims_with(&[("iss", json!(other)), ("aud", json!("bastion"))]);
    assert_eq!(
        v.validate(&b.sign(&for_b)).await.expect("issuer b").issuer,
        other
    );
    // Issuer b's claims signed with issuer a's key: a's kid is unknown to b.
    assert_eq!(reject(&v, &a.sign(&for_b)).await.reason(), "unknown_kid");
    // Issuer b's audience does not carry over to issuer a.
    assert_eq!(
        reject(&v, &a.sign(&claims_with(&[("aud", json!("bastion"))])))
            .await
            .reason(),
        "wrong_audience"
    );
}

#[tokio::test]
async fn hs256_works_only_with_a_configured_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "dev-only-shared-secret-of-32-bytes\n").expect("write secret");
    let v = validator(&format!(
        "[[issuer]]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\nhs256_secret_file = {secret:?}\n"
    ))
    .await;
    let sign = |alg, secret: &[u8]| {
        jsonwebtoken::encode(
            &Header::new(alg),
            &gitlab_claims(),
            &EncodingKey::from_secret(secret),
        )
        .expect("sign")
    };
    let ok = v
        .validate(&sign(
            Algorithm::HS256,
            b"dev-only-shared-secret-of-32-bytes",
        ))
        .await
        .expect("dev token");
    assert_eq!(ok.claims["project_path"], json!("group/app"));
    assert_eq!(
        reject(&v, &sign(Algorithm::HS256, b"guessed")).await,
        TokenError::BadSignature
    );
    assert_eq!(
        reject(
            &v,
            &sign(Algorithm::HS384, b"dev-only-shared-secret-of-32-bytes")
        )
        .await
        .reason(),
        "alg_not_allowed"
    );
    let rsa = TestKey::new("rsa-rs256", Algorithm::RS256);
    assert_eq!(
        reject(&v, &rsa.sign(&gitlab_claims())).await.reason(),
        "alg_not_allowed"
    );
}

#[tokio::test]
async fn jwks_keys_that_cannot_be_used_safely_are_skipped() {
    let good = TestKey::new("good", Algorithm::ES256);
    let mut mislabeled = TestKey::new("rsa-as-es", Algorithm::RS256).jwk();
    mislabeled["alg"] = json!("ES256");
    let doc = json!({ "keys": [
        { "kty": "oct", "kid": "hmac", "k": URL_SAFE_NO_PAD.encode("secret"), "alg": "HS256" },
        mislabeled,
        { "kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB" },
        { "kty": "weird" },
        good.jwk(),
    ]});
    let set =
        tcpgate::auth::jwks::KeySet::parse(doc.to_string().as_bytes()).expect("one usable key");
    assert_eq!(set.len(), 1);
    assert!(set.find(Some("good")).is_some());
    assert!(set.find(Some("hmac")).is_none());
    assert!(
        set.find(None).is_some(),
        "a lone key serves tokens without kid"
    );
    let none = json!({ "keys": [{ "kty": "oct", "k": "c2VjcmV0" }] });
    assert!(tcpgate::auth::jwks::KeySet::parse(none.to_string().as_bytes()).is_err());
    assert!(tcpgate::auth::jwks::KeySet::parse(b"<html>").is_err());
}

/// The key-set version (which empties the verified-token cache) moves when
/// a fetch brings other keys, and only then: refetching the same document
/// keeps every cached answer.
#[tokio::test]
async fn the_key_set_version_moves_only_when_the_keys_change() {
    let key = TestKey::new("ec-p256", Algorithm::ES256);
    let (dir, v) =
        file_validator(std::slice::from_ref(&key), "min_refresh_interval = \"1ms\"").await;
    let start = v.keys_version();
    let mut stranger = TestKey::new("ec-p256", Algorithm::ES256);
    stranger.kid = "not-published".into();
    // An unknown kid refetches the file: the same document.
    assert_eq!(
        reject(&v, &stranger.sign(&gitlab_claims())).await.reason(),
        "unknown_kid"
    );
    assert_eq!(v.keys_version(), start, "same keys, same version");
    // The issuer publishes the new key next to the old one.
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&key, &stranger])).expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    v.validate(&stranger.sign(&gitlab_claims()))
        .await
        .expect("the new key after the refetch");
    assert_ne!(v.keys_version(), start, "other keys, another version");
}
