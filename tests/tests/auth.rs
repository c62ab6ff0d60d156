//! Token authentication through the agent: real keys, a JWKS over HTTPS,
//! GitLab-shaped tokens, policy by claim, and every kind of denial, each
//! proven to reach no upstream connect and no upstream byte.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use anyhow::{Result, ensure};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tcpgate_tests::auth_fixture::{AuthFixture, authenticate, read_answer};
use tcpgate_tests::preamble::encode as preamble;
use tcpgate_tests::tokens::{TestKey, claims_with, key_files, unix_now};
use tcpgate_tests::wait_events;
use tcpgate_tests::{accept_loop, require_root};

/// The upstream that must never see a denied client.
fn tripwire(fx: &AuthFixture) -> Result<tcpgate_tests::AcceptLoop<SocketAddr>> {
    Ok(accept_loop(
        &fx.topo.target,
        AuthFixture::target(9000),
        100,
        |mut stream, peer| {
            let mut buf = [0u8; 1024];
            while stream.read(&mut buf).is_ok_and(|n| n > 0) {}
            peer
        },
    )?)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A correctly signed token whose header claims another algorithm family:
/// HS256 with the RSA public key's PEM as the HMAC secret.
fn key_confusion_token(fx: &AuthFixture) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(fx.keys.rsa.kid.clone());
    let secret = EncodingKey::from_secret(&key_files().rsa_public);
    jsonwebtoken::encode(&header, &claims_with(&[]), &secret).unwrap_or_default()
}

#[test]
fn every_denial_reaches_no_upstream() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let wire = tripwire(&fx)?;
    let now = unix_now();
    let good = fx.token();
    let mut tampered: Vec<&str> = good.split('.').collect();
    let evil_payload = b64(claims_with(&[
        ("project_path", json!("group/app")),
        ("ref", json!("release/9")),
    ])
    .to_string()
    .as_bytes());
    tampered[1] = &evil_payload;
    let tampered = tampered.join(".");
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims_with(&[]).to_string().as_bytes())
    );
    let unknown_kid = TestKey::rsa2("not-published").sign(&claims_with(&[]));
    let token_cases: Vec<(&str, String)> = vec![
        (
            "token_expired",
            fx.keys.rsa.sign(&claims_with(&[
                ("exp", json!(now - 120)),
                ("iat", json!(now - 400)),
                ("nbf", json!(now - 400)),
            ])),
        ),
        (
            "token_not_yet_valid",
            fx.keys.rsa.sign(&claims_with(&[("nbf", json!(now + 120))])),
        ),
        (
            "wrong_issuer",
            fx.keys
                .rsa
                .sign(&claims_with(&[("iss", json!("https://evil.example.com"))])),
        ),
        (
            "wrong_audience",
            fx.keys
                .rsa
                .sign(&claims_with(&[("aud", json!("someone-else"))])),
        ),
        ("bad_signature", tampered),
        ("alg_not_allowed", alg_none),
        ("alg_not_allowed", key_confusion_token(&fx)),
        ("unknown_kid", unknown_kid),
        (
            "missing_exp",
            fx.keys.rsa.sign(&claims_with(&[("exp", Value::Null)])),
        ),
    ];
    let mut expected = Vec::new();
    for (reason, token) in &token_cases {
        let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
        let (status, message) = authenticate(&mut stream, token)?;
        ensure!(
            status == 1,
            "{reason}: expected a denial, got status {status} {message:?}"
        );
        // The client learns the reason code only: never the audience, the
        // issuer it expected, or a kid.
        ensure!(
            message == format!("access denied ({reason})"),
            "{reason}: generic answer expected, got {message:?}"
        );
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        ensure!(rest.is_empty(), "{reason}: nothing may follow a denial");
        expected.push(*reason);
    }
    // Protocol-level failures: no answer, just a close.
    let raw_cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("truncated", preamble(&good)[..20].to_vec(), true),
        (
            "bad_magic",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        ("oversized", b"TCPG\x01\x00\xff\xff".to_vec(), false),
        ("timeout", b"TCP".to_vec(), false),
    ];
    for (reason, bytes, half_close) in &raw_cases {
        let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
        stream.write_all(bytes)?;
        if *half_close {
            stream.shutdown(Shutdown::Write)?;
        }
        // The slowloris case sends 3 bytes and stalls: the 2 s preamble
        // deadline ends it. Either way the connection must end.
        let mut rest = Vec::new();
        match stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => anyhow::bail!("{reason}: the agent must close the connection: {e}"),
        }
        expected.push(*reason);
    }
    let denied = wait_events(&fx.agent, "connection_denied", expected.len())?;
    for (event, reason) in denied.iter().zip(&expected) {
        ensure!(event["reason"] == "auth_failed", "{event}");
        ensure!(
            event["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with(reason)),
            "expected {reason}: {event}"
        );
        ensure!(
            event.get("upstream").is_none(),
            "no upstream for a denied connection: {event}"
        );
    }
    ensure!(
        fx.agent
            .audit_events()?
            .iter()
            .all(|e| e["event"] == "connection_denied"),
        "no session may open"
    );
    ensure!(
        wire.stop()?.is_empty(),
        "the upstream saw a connection from a denied client"
    );
    Ok(())
}

/// All three key types admit; the audit names the subject and the
/// configured claims but never the token.
#[test]
fn rsa_ec_and_ed25519_tokens_are_admitted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = tcpgate_tests::auth_fixture::echo_service(&fx, b"")?;
    for key in [&fx.keys.rsa, &fx.keys.ec, &fx.keys.ed] {
        let token = key.sign(&claims_with(&[]));
        let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
        let (status, message) = authenticate(&mut stream, &token)?;
        ensure!(status == 0, "{:?}: {message}", key.alg);
        stream.write_all(b"ping")?;
        let mut back = [0u8; 4];
        stream.read_exact(&mut back)?;
        ensure!(&back == b"ping", "echo through the splice");
    }
    let closed = wait_events(&fx.agent, "session_close", 3)?;
    let audit = std::fs::read_to_string(fx.agent.audit_path())?;
    for event in &closed {
        ensure!(
            event["subject"] == "project_path:group/app:ref_type:branch:ref:release/1.4",
            "{event}"
        );
        ensure!(
            event["claims"]["project_path"] == "group/app"
                && event["claims"]["job_id"] == "1234567",
            "{event}"
        );
        ensure!(
            event["kernel_bytes_up"] == 4 && event["userspace_bytes_up"] == 0,
            "payload through the kernel: {event}"
        );
        ensure!(event["grant_id"].is_string(), "{event}");
    }
    ensure!(
        !audit.contains(&fx.token()[..40]),
        "the audit log must never contain a token"
    );
    server.stop()?;
    Ok(())
}

/// Deny by default, allow by claim: another project, an unprotected ref and
/// a ref outside the glob are all refused.
#[test]
fn policy_matches_claims() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let wire = tripwire(&fx)?;
    let refused = [
        claims_with(&[("project_path", json!("group/other"))]),
        claims_with(&[("ref_protected", json!("false"))]),
        claims_with(&[("ref", json!("main"))]),
    ];
    for claims in &refused {
        let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
        let (status, message) = authenticate(&mut stream, &fx.keys.rsa.sign(claims))?;
        ensure!(
            status == 1 && message == "access denied (no_rule_matched)",
            "{claims}: {status} {message}"
        );
    }
    let denied = wait_events(&fx.agent, "connection_denied", refused.len())?;
    for event in &denied {
        ensure!(
            event["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("no_rule_matched")),
            "{event}"
        );
        ensure!(
            event["subject"].is_string(),
            "a valid token's subject is audited: {event}"
        );
    }
    ensure!(wire.stop()?.is_empty(), "no upstream connection");
    Ok(())
}

/// The issuer rotates its signing key: the agent fetches the new JWKS on
/// the unknown kid (once), and tokens of the removed key stop working.
#[test]
fn jwks_rotation_during_operation() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = tcpgate_tests::auth_fixture::echo_service(&fx, b"")?;
    let old = fx.keys.rsa.sign(&claims_with(&[]));
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    ensure!(
        authenticate(&mut stream, &old)?.0 == 0,
        "old key works before rotation"
    );
    drop(stream);
    let hits_before = fx.jwks.hits();

    let new_key = TestKey::rsa2("rsa-2");
    fx.jwks
        .set_document(tcpgate_tests::tokens::jwks(&[&new_key, &fx.keys.ec]));
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &new_key.sign(&claims_with(&[])))?;
    ensure!(status == 0, "new key after rotation: {message}");
    ensure!(
        fx.jwks.hits() == hits_before + 1,
        "exactly one refresh for the unknown kid"
    );
    drop(stream);

    // The old key is gone from the document; past the refresh interval its
    // tokens no longer validate.
    std::thread::sleep(Duration::from_millis(1100));
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &old)?;
    ensure!(
        status == 1 && message.contains("kid"),
        "old key after rotation: {status} {message}"
    );
    server.stop()?;
    Ok(())
}

#[test]
fn read_answer_helper_rejects_non_frames() -> Result<()> {
    // The helper itself must not accept arbitrary bytes as an answer.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        s.write_all(b"HTTP/1.1 200 OK\r\n")?;
        Ok(())
    });
    let mut client = std::net::TcpStream::connect(addr)?;
    ensure!(
        read_answer(&mut client).is_err(),
        "garbage is not an answer"
    );
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    Ok(())
}

/// SIGHUP applies a changed policy to new connections.
#[test]
fn sighup_reloads_the_policy() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut fx = AuthFixture::start()?;
    let server = tcpgate_tests::auth_fixture::echo_service(&fx, b"")?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    ensure!(
        authenticate(&mut stream, &fx.token())?.0 == 0,
        "allowed before the reload"
    );
    drop(stream);
    let path = fx.agent.config_path().to_owned();
    let text = std::fs::read_to_string(&path)?;
    let narrowed = text.replace(
        "ports = [\"22\", \"5432\", \"9000\"] } ]",
        "ports = [\"5432\"] } ]",
    );
    ensure!(
        narrowed != text,
        "the policy's allow list was found in the config"
    );
    std::fs::write(&path, narrowed)?;
    fx.agent.signal(tcpgate_tests::Signal::SIGHUP)?;
    fx.agent
        .wait_for_log("reloaded the policy", Duration::from_secs(20))?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &fx.token())?;
    ensure!(
        status == 1,
        "port 9000 is no longer allowed: {status} {message}"
    );
    server.stop()?;
    Ok(())
}
