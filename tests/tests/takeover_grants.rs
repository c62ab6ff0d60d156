//! Takeover of an authenticating, intercepting agent: the grants and the
//! grant API's listeners move to the successor, the interception stays in
//! place, and a grant that expires while its session drains in the old
//! agent still ends that session at expiry.

use std::io::Read;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, streamer};
use tcpgate_tests::payload::read_until_end;
use tcpgate_tests::takeover::{AuthTakeover, exits_by_itself, stops_cleanly};
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::{require_root, wait_events};

#[test]
fn a_grant_expiring_during_the_handover_still_ends_its_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut t = AuthTakeover::start()?;
    let fx = &t.fx;
    let server = streamer(fx, Duration::from_secs(90))?;
    // Long enough for the takeover to be over before it.
    let exp = unix_now() + 15;
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
    let token = fx.keys.rsa.sign(&claims_with(&[("exp", json!(exp))]));
    fx.grant_from_runner(&token, &[])?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut drained = fx.dial_from_runner(AuthFixture::target(5432))?;
    drained.read_exact(&mut buf)?;
    let mut next = t.take_over()?;
    let fx = &mut t.fx;
    // Routes, rules and link were taken over in place, not cleaned up as
    // after a crash.
    ensure!(
        !next.logs().contains("left by a previous agent"),
        "{}",
        next.logs_tail(30)
    );
    // The grant moved with its expiry: the successor admits the runner's
    // plain connection (intercepted, like the first) without a new grant.
    let mut adopted = fx
        .dial_from_runner(AuthFixture::target(5432))
        .with_context(|| next.logs_tail(30))?;
    adopted.read_exact(&mut buf)?;
    let (old_bytes, old_end) = read_until_end(&mut drained);
    let (_, new_end) = read_until_end(&mut adopted);
    ensure!(old_bytes > 64 * 1024, "the drained session kept streaming");
    ensure!(
        old_end >= expiry && new_end >= expiry,
        "no session ends before its grant"
    );
    let closes = wait_events(&fx.agent, "session_close", 2)?;
    let (old, new): (Vec<_>, Vec<_>) = closes.iter().partition(|e| e["handover"] == "drained");
    ensure!(old.len() == 1 && new.len() == 1, "{closes:?}");
    ensure!(old[0]["reason"] == "grant_expired", "{}", old[0]);
    ensure!(new[0]["reason"] == "grant_expired", "{}", new[0]);
    exits_by_itself(&mut fx.agent, "the old agent exits once drained")?;
    // The old agent left the interception to the successor: a fresh grant
    // is issued by the successor's API and admits.
    let token = fx
        .keys
        .rsa
        .sign(&claims_with(&[("exp", json!(unix_now() + 60))]));
    fx.grant_from_runner(&token, &[])?;
    let mut fresh = fx.dial_from_runner(AuthFixture::target(5432))?;
    fresh.read_exact(&mut buf)?;
    drop(fresh);
    stops_cleanly(&mut next)?;
    drop(server);
    Ok(())
}

/// From the attacker's side: a CI job's token revoked before an upgrade
/// must not get a grant from the new agent (the deny list moves with the
/// grants), while another job's token still does.
#[test]
fn a_token_revoked_before_the_takeover_stays_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let t = AuthTakeover::start()?;
    let fx = &t.fx;
    let admin = fx.admin_socket().display().to_string();
    let revoked = fx.keys.rsa.sign(&claims_with(&[("jti", json!("job-1"))]));
    let grant = fx.grant_from_runner(&revoked, &[])?;
    let (status, stdout, stderr) =
        fx.cli(&fx.topo.bastion, &["revoke", "--admin", &admin, &grant])?;
    ensure!(status == 0, "revoke: {status} {stdout} {stderr}");
    ensure!(
        fx.grant_from_runner(&revoked, &[]).is_err(),
        "the old agent refuses the revoked token"
    );
    let mut next = t.take_over()?;
    let refused = fx.grant_from_runner(&revoked, &[]);
    ensure!(
        refused.is_err(),
        "the successor granted a revoked token: {refused:?}\n{}",
        next.logs_tail(20)
    );
    let other = fx.keys.rsa.sign(&claims_with(&[("jti", json!("job-2"))]));
    fx.grant_from_runner(&other, &[])
        .context("another job's token is granted by the successor")?;
    stops_cleanly(&mut next)?;
    Ok(())
}
