//! Takeover of an authenticating, intercepting agent: the grants and the
//! grant API's listeners move to the successor, the interception stays in
//! place, and a grant that expires while its session drains in the old
//! agent still ends that session at expiry.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, policy};
use tcpgate_tests::takeover::{agent_lines, successor, wait_taken_over};
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::{Payload, accept_loop, require_root, wait_events};

/// A server that streams until the connection breaks (bounded).
fn streamer(fx: &AuthFixture) -> Result<tcpgate_tests::AcceptLoop<u64>> {
    Ok(accept_loop(
        &fx.topo.target,
        AuthFixture::target(5432),
        10,
        |mut stream, _| {
            let chunk = Payload::new(1, 64 * 1024).to_vec();
            let mut sent = 0u64;
            let deadline = Instant::now() + Duration::from_secs(90);
            while Instant::now() < deadline && stream.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(5));
            }
            sent
        },
    )?)
}

/// Reads until the stream ends; returns (bytes, when it ended).
fn read_until_end(stream: &mut TcpStream) -> (u64, SystemTime) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return (total, SystemTime::now()),
            Ok(n) => total += n as u64,
        }
    }
}

#[test]
fn a_grant_expiring_during_the_handover_still_ends_its_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut fx = AuthFixture::start_launched(
        &policy("15m"),
        &[],
        Launch {
            agent_extra: agent_lines(dir.path()),
            ..Launch::default()
        },
    )?;
    let server = streamer(&fx)?;
    // Long enough for the takeover to be over before it.
    let exp = unix_now() + 15;
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
    let token = fx.keys.rsa.sign(&claims_with(&[("exp", json!(exp))]));
    fx.grant_from_runner(&token, &[])?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut drained = fx.dial_from_runner(AuthFixture::target(5432))?;
    drained.read_exact(&mut buf)?;
    let mut next = successor(&fx.topo.bastion, fx.agent.config_path(), &[], &[])?;
    wait_taken_over(&fx.agent)?;
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
    let status = fx
        .agent
        .wait_exit(Duration::from_secs(60))?
        .context("the old agent exits once drained")?;
    ensure!(status.success(), "{status:?}\n{}", fx.agent.logs_tail(20));
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
    let status = next.stop()?;
    ensure!(status.success(), "{status:?}\n{}", next.logs_tail(20));
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
    let dir = tempfile::tempdir()?;
    let fx = AuthFixture::start_launched(
        &policy("15m"),
        &[],
        Launch {
            agent_extra: agent_lines(dir.path()),
            ..Launch::default()
        },
    )?;
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
    let mut next = successor(&fx.topo.bastion, fx.agent.config_path(), &[], &[])?;
    wait_taken_over(&fx.agent)?;
    let refused = fx.grant_from_runner(&revoked, &[]);
    ensure!(
        refused.is_err(),
        "the successor granted a revoked token: {refused:?}\n{}",
        next.logs_tail(20)
    );
    let other = fx.keys.rsa.sign(&claims_with(&[("jti", json!("job-2"))]));
    fx.grant_from_runner(&other, &[])
        .context("another job's token is granted by the successor")?;
    let status = next.stop()?;
    ensure!(status.success(), "{status:?}\n{}", next.logs_tail(20));
    Ok(())
}
