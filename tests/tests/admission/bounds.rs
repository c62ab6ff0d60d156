//! Bounds from the attacker's side: idle unauthenticated floods, the
//! preamble length cap, the grant caps, and attacker-chosen strings; each
//! holds while a legitimate session keeps its bytes exact.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tcpgate_tests::tokens::claims_with;
use tcpgate_tests::{Payload, read_exact_hashed, require_root, write_payload};

use tcpgate_tests::auth_fixture::{AuthFixture, authenticate, policy};
use tcpgate_tests::wait_events;

fn limits_policy(limits: &str) -> String {
    format!("\n[auth.limits]\n{limits}\n{}", policy("15m"))
}

fn limit_hits(fx: &AuthFixture, limit: &str) -> Result<f64> {
    let text = tcpgate_tests::metrics::scrape_unix(&fx.admin_socket())?;
    Ok(
        tcpgate_tests::metrics::parse(&text)?
            .count("tcpgate_limit_hits_total", &[("limit", limit)]),
    )
}

/// Sends 1 MiB on an admitted session and checks the echo by SHA-256.
fn exchange_exact(stream: &mut std::net::TcpStream, seed: u64) -> Result<()> {
    let payload = Payload::new(seed, 1 << 20);
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || write_payload(&mut writer, &payload));
    let got = read_exact_hashed(stream, 1 << 20)?;
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(got == sent, "the echoed bytes differ (SHA-256)");
    Ok(())
}

/// A new legitimate preamble session, its bytes checked.
fn legit_session(fx: &AuthFixture) -> Result<()> {
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &fx.token())?;
    ensure!(status == 0, "legit client refused: {message}");
    exchange_exact(&mut stream, 7)
}

/// Idle unauthenticated connections from one source, then from several:
/// the pending bounds hold (oldest shed, counted), the agent stays
/// responsive, and a legitimate session keeps its bytes exact.
#[test]
fn idle_floods_are_shed_and_a_legit_session_is_exact() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start_with(
        &limits_policy("pending_connections = 24\npending_per_source = 8\n"),
        &[],
    )?;
    let server = tcpgate_tests::auth_fixture::echo_service(&fx, b"")?;
    let target = AuthFixture::target(9000);
    // One source: 64 idle connections, 8 may wait.
    let mut flood = Vec::new();
    for _ in 0..64 {
        flood.push(fx.dial_from_runner(target)?);
    }
    tcpgate_tests::eventually(
        Duration::from_secs(20),
        "56 shed by pending_per_source",
        || limit_hits(&fx, "pending_per_source").is_ok_and(|n| n >= 56.0),
    )?;
    legit_session(&fx)?;
    drop(flood);
    // Several sources, 10 each: over the total of 24.
    let mut flood = Vec::new();
    for i in 3..=7u8 {
        fx.topo
            .runner
            .ip(["addr", "add", &format!("198.51.100.{i}/24"), "dev", "eth0"])?;
        for _ in 0..10 {
            let source = IpAddr::V4(Ipv4Addr::new(198, 51, 100, i));
            flood.push(tcpgate_tests::dial_from(&fx.topo.runner, source, target)?);
        }
    }
    tcpgate_tests::eventually(
        Duration::from_secs(20),
        // 5 sources of 10: each sheds 2 of its own (8 per source); past
        // 24 pending in all, the first 8 of each of the last two sources
        // shed the oldest of all.
        "16 shed by pending_connections",
        || limit_hits(&fx, "pending_connections").is_ok_and(|n| n >= 16.0),
    )?;
    legit_session(&fx)?;
    drop(flood);
    server.stop()?;
    Ok(())
}

/// A declared preamble length over `max_preamble_bytes` is refused from
/// the header, before any token byte arrives.
#[test]
fn preamble_length_cap_is_checked_before_reading() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start_with(&limits_policy("max_preamble_bytes = 1024\n"), &[])?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    // Declares 4000 token bytes and sends none: the answer comes at once.
    stream.write_all(b"TCPG\x01\x00\x0f\xa0")?;
    let (status, message) = tcpgate_tests::preamble::read_answer(&mut stream)?;
    ensure!(
        status == 2 && message.contains("exceeds the limit of 1024"),
        "{status} {message}"
    );
    let denied = wait_events(&fx.agent, "connection_denied", 1)?;
    ensure!(
        denied[0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("oversized")),
        "{}",
        denied[0]
    );
    Ok(())
}

/// `POST /v1/grants` from `source` on the runner, over HTTPS with curl;
/// returns the status line, headers and body.
fn post_grant_from(fx: &AuthFixture, source: Ipv4Addr, token: &str) -> Result<String> {
    let url = format!("{}/v1/grants", AuthFixture::api_url());
    let output = fx
        .topo
        .runner
        .command("curl")
        .args(["-sS", "-i", "--http1.1", "--max-time", "20", "--cacert"])
        .arg(&fx.api_ca)
        .args(["--interface", &source.to_string(), "-X", "POST", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .args(["-H", "Content-Length: 0", &url])
        .output()?;
    ensure!(
        output.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn token_for(fx: &AuthFixture, job: &str) -> String {
    fx.keys.rsa.sign(&claims_with(&[
        (
            "sub",
            json!(format!("project_path:group/app:ref_type:branch:ref:{job}")),
        ),
        ("jti", json!(job)),
    ]))
}

/// Each grant cap holds (per subject, per source, in total), is counted in
/// /metrics, and a session live meanwhile keeps its bytes exact.
#[test]
fn grant_caps_hold_while_a_live_session_stays_exact() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start_with(
        &limits_policy("grants_per_subject = 2\ngrants_per_source = 3\nmax_grants = 4\n"),
        &[],
    )?;
    let server = tcpgate_tests::auth_fixture::echo_service(&fx, b"")?;
    // A session that lives through all of it.
    let mut live = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut live, &fx.token())?;
    ensure!(status == 0, "{message}");

    let runner = Ipv4Addr::new(198, 51, 100, 2);
    let second = Ipv4Addr::new(198, 51, 100, 3);
    fx.topo
        .runner
        .ip(["addr", "add", "198.51.100.3/24", "dev", "eth0"])?;
    let created = |answer: &str| answer.starts_with("HTTP/1.1 201");
    let refused = |answer: &str, limit: &str| {
        answer.starts_with("HTTP/1.1 429")
            && answer.contains("grant_limit")
            && answer.contains(limit)
    };
    let a = token_for(&fx, "a");
    for _ in 0..2 {
        let answer = post_grant_from(&fx, runner, &a)?;
        ensure!(created(&answer), "{answer}");
    }
    let answer = post_grant_from(&fx, runner, &a)?;
    ensure!(refused(&answer, "grants_per_subject"), "{answer}");
    ensure!(created(&post_grant_from(
        &fx,
        runner,
        &token_for(&fx, "b")
    )?));
    let answer = post_grant_from(&fx, runner, &token_for(&fx, "c"))?;
    ensure!(refused(&answer, "grants_per_source"), "{answer}");
    ensure!(created(&post_grant_from(
        &fx,
        second,
        &token_for(&fx, "d")
    )?));
    let answer = post_grant_from(&fx, second, &token_for(&fx, "e"))?;
    ensure!(refused(&answer, "max_grants"), "{answer}");
    for limit in ["grants_per_subject", "grants_per_source", "max_grants"] {
        ensure!(limit_hits(&fx, limit)? == 1.0, "{limit} counted once");
    }

    // The live session, then a new one: bytes exact.
    exchange_exact(&mut live, 11)?;
    legit_session(&fx)?;
    drop(live);
    server.stop()?;
    Ok(())
}

/// A token with a 3 KB `kid` (within the default 8 KiB preamble cap once
/// base64-encoded): the client is told the reason code only, and neither
/// the audit line nor the agent's log copies the attacker's string whole.
#[test]
fn attacker_chosen_strings_are_cut_and_not_echoed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let kid = "K".repeat(3000);
    let token = tcpgate_tests::tokens::TestKey::rsa2(&kid).sign(&claims_with(&[]));
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &token)?;
    ensure!(
        status == 1 && message == "access denied (unknown_kid)",
        "{status} {message:?}"
    );
    let denied = &wait_events(&fx.agent, "connection_denied", 1)?[0];
    let detail = denied["detail"].as_str().context("detail")?;
    ensure!(
        detail.starts_with("unknown_kid") && detail.len() < 700 && detail.contains("bytes]"),
        "detail of {} bytes: {detail}",
        detail.len()
    );
    ensure!(
        denied.to_string().len() < 2048,
        "the audit line is {} bytes",
        denied.to_string().len()
    );
    ensure!(
        !fx.agent.logs().contains(&"K".repeat(1024)),
        "the agent's log copies the kid whole"
    );
    // The grant API answers the reason code, not the audience it expected.
    let wrong = fx
        .keys
        .rsa
        .sign(&claims_with(&[("aud", json!("someone-else"))]));
    let answer = post_grant_from(&fx, Ipv4Addr::new(198, 51, 100, 2), &wrong)?;
    ensure!(
        answer.starts_with("HTTP/1.1 401")
            && answer.contains("access denied (wrong_audience)")
            && !answer.contains(tcpgate_tests::tokens::AUDIENCE),
        "{answer}"
    );
    Ok(())
}
