//! The verified-token cache, from the attacker's side: a token the agent
//! has verified and cached is still refused once it is revoked, once its
//! signing key is rotated out, and once it expires. Each test first proves
//! the token was served from the cache (the hit counter moved), so the
//! refusal that follows is the cache's doing, not a first verification.

use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, authenticate, echo_service};
use tcpgate_tests::metrics::{parse, scrape_unix};
use tcpgate_tests::tokens::{TestKey, claims_with, unix_now};
use tcpgate_tests::{eventually, require_root, wait_events};

/// The token cache's hit and miss counters.
fn cache_counts(fx: &AuthFixture) -> Result<(f64, f64)> {
    let metrics = parse(&scrape_unix(&fx.admin_socket())?)?;
    Ok((
        metrics.count("tcpgate_token_cache_hits_total", &[]),
        metrics.count("tcpgate_token_cache_misses_total", &[]),
    ))
}

/// Connects to the intercepted echo port and sends `token`'s preamble;
/// returns the agent's answer and the stream (open while admitted).
fn present(fx: &AuthFixture, token: &str) -> Result<(u8, String, TcpStream)> {
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, token)?;
    Ok((status, message, stream))
}

/// Admits `token` twice and proves the second admission was a cache hit.
fn admit_twice_from_cache(fx: &AuthFixture, token: &str) -> Result<Vec<TcpStream>> {
    let mut open = Vec::new();
    let before = cache_counts(fx)?;
    for round in 0..2 {
        let (status, message, stream) = present(fx, token)?;
        ensure!(status == 0, "round {round}: {status} {message}");
        open.push(stream);
    }
    let after = cache_counts(fx)?;
    ensure!(
        after.0 >= before.0 + 1.0,
        "the second connection was served from the cache: {before:?} -> {after:?}"
    );
    Ok(open)
}

/// Whether the `n`th `connection_denied` audit line is an authentication
/// failure for the stable reason `reason`, and names no upstream.
fn nth_denial_is(fx: &AuthFixture, n: usize, reason: &str) -> Result<()> {
    let denied = wait_events(&fx.agent, "connection_denied", n)?;
    let event = &denied[n - 1];
    let detail = event["detail"].as_str().context("detail")?;
    ensure!(
        event["reason"] == "auth_failed" && detail.starts_with(reason),
        "expected {reason}: {event}"
    );
    ensure!(event.get("upstream").is_none(), "no upstream: {event}");
    Ok(())
}

#[test]
fn a_revoked_token_is_refused_though_it_was_cached() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = echo_service(&fx, b"")?;
    let token = fx
        .keys
        .rsa
        .sign(&claims_with(&[("jti", json!("cached-1"))]));
    let open = admit_twice_from_cache(&fx, &token)?;
    let admin = fx.admin_socket().display().to_string();
    let subject = "project_path:group/app:ref_type:branch:ref:release/1.4";
    let (status, stdout, stderr) = fx.cli(
        &fx.topo.bastion,
        &["revoke", "--admin", &admin, "--subject", subject],
    )?;
    ensure!(status == 0, "revoke: {status} {stdout} {stderr}");
    let (status, message, _stream) = present(&fx, &token)?;
    ensure!(status == 1, "revoked token admitted: {status} {message}");
    nth_denial_is(&fx, 1, "revoked")?;
    drop(open);
    let served = server.stop()?;
    ensure!(
        served.len() == 2,
        "only the two admitted sessions reached the upstream: {served:?}"
    );
    Ok(())
}

#[test]
fn a_cached_token_whose_key_was_rotated_out_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = echo_service(&fx, b"")?;
    let old = fx.keys.rsa.sign(&claims_with(&[]));
    drop(admit_twice_from_cache(&fx, &old)?);
    // The issuer rotates: rsa-1 leaves the key set. The first token of the
    // new key makes the agent fetch the new set.
    let new_key = TestKey::rsa2("rsa-2");
    fx.jwks
        .set_document(tcpgate_tests::tokens::jwks(&[&new_key, &fx.keys.ec]));
    let (status, message, new) = present(&fx, &new_key.sign(&claims_with(&[])))?;
    ensure!(status == 0, "new key after rotation: {message}");
    drop(new);
    let (status, message, _old) = present(&fx, &old)?;
    ensure!(
        status == 1,
        "a token of the rotated-out key was admitted from the cache: {message}"
    );
    nth_denial_is(&fx, 1, "unknown_kid")?;
    server.stop()?;
    Ok(())
}

#[test]
fn an_expired_cached_token_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = echo_service(&fx, b"")?;
    let exp = unix_now() + 3;
    let token = fx.keys.rsa.sign(&claims_with(&[("exp", json!(exp))]));
    drop(admit_twice_from_cache(&fx, &token)?);
    eventually(Duration::from_secs(10), "the token's exp to pass", || {
        unix_now() > exp
    })?;
    let (status, message, _stream) = present(&fx, &token)?;
    ensure!(status == 1, "expired token admitted: {message}");
    nth_denial_is(&fx, 1, "token_expired")?;
    server.stop()?;
    Ok(())
}

/// The claims a token's sessions share (see `auth::claims_memo`) are only
/// ever the token's own: two tokens of two subjects, each served from the
/// cache after its first admission and interleaved, open sessions whose
/// audit lines name their own subject and audit claims. Then revoking one
/// subject ends its live sessions and not the other's, which is still
/// admitted.
#[test]
fn cached_tokens_never_share_an_identity_and_revocation_ends_their_sessions() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = echo_service(&fx, b"")?;
    let job = |r#ref: &str, job_id: &str| {
        let subject = format!("project_path:group/app:ref_type:branch:ref:{ref}");
        let token = fx.keys.rsa.sign(&claims_with(&[
            ("sub", json!(subject)),
            ("ref", json!(r#ref)),
            ("job_id", json!(job_id)),
            ("jti", json!(format!("jti-{job_id}"))),
        ]));
        (subject, token)
    };
    let (subject_a, token_a) = job("release/1.4", "1001");
    let (subject_b, token_b) = job("release/2.0", "2002");
    let mut open = Vec::new();
    for (i, token) in [&token_a, &token_b, &token_a, &token_b]
        .into_iter()
        .enumerate()
    {
        let (status, message, stream) = present(&fx, token)?;
        ensure!(status == 0, "admission {i}: {status} {message}");
        open.push(stream);
    }
    let (hits, _) = cache_counts(&fx)?;
    ensure!(
        hits >= 2.0,
        "the last two admissions were cache hits: {hits}"
    );
    // Each open line is consistent in itself, and each token opened two:
    // the lines follow the sessions' setup, not the admissions' order.
    let opened = wait_events(&fx.agent, "session_open", 4)?;
    let mut per_subject = [0; 2];
    for event in &opened {
        let own = [
            (&subject_a, "release/1.4", "1001"),
            (&subject_b, "release/2.0", "2002"),
        ]
        .iter()
        .position(|(subject, r#ref, job_id)| {
            event["subject"] == subject.as_str()
                && event["claims"]["ref"] == *r#ref
                && event["claims"]["job_id"] == *job_id
        });
        let Some(which) = own else {
            anyhow::bail!("a session carries another token's identity: {event}");
        };
        per_subject[which] += 1;
    }
    ensure!(
        per_subject == [2, 2],
        "two sessions per token: {per_subject:?}"
    );
    let admin = fx.admin_socket().display().to_string();
    let (status, stdout, stderr) = fx.cli(
        &fx.topo.bastion,
        &["revoke", "--admin", &admin, "--subject", &subject_a],
    )?;
    ensure!(status == 0, "revoke: {status} {stdout} {stderr}");
    let closed = wait_events(&fx.agent, "session_close", 2)?;
    for event in &closed {
        ensure!(
            event["subject"] == subject_a.as_str() && event["reason"] == "revoked",
            "only the revoked subject's sessions end: {event}"
        );
    }
    let (status, message, stream) = present(&fx, &token_b)?;
    ensure!(status == 0, "the other subject still admits: {message}");
    let (status, message, _refused) = present(&fx, &token_a)?;
    ensure!(status == 1, "revoked subject admitted: {message}");
    drop((open, stream));
    server.stop()?;
    Ok(())
}
