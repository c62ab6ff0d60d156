//! `/metrics`, scraped and parsed as the Prometheus text format, checked
//! against the traffic the test sent: accepted and denied connections by
//! reason, bytes by direction from the kernel counters, latencies, the
//! teardown after expiry, and the eBPF counters.

use std::io::Write;

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, authenticate};
use tcpgate_tests::metrics::{Exposition, parse, scrape_unix};
use tcpgate_tests::operator::{self as op, sized_server};
use tcpgate_tests::require_root;
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::wait_events;

/// Five denials: two with bad magic, one stalling into the preamble
/// timeout, one token no rule matches, one expired token.
fn send_denials(fx: &AuthFixture) -> Result<()> {
    let target = AuthFixture::target(9000);
    for bytes in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"SSH-2.0-x\r\n", b"TCP"] {
        let mut stream = fx.dial_from_runner(target)?;
        stream.write_all(bytes)?;
        if !op::ended(&mut stream) {
            bail!("denied connection not closed");
        }
    }
    let now = unix_now();
    for token in [
        fx.keys
            .rsa
            .sign(&claims_with(&[("project_path", json!("group/other"))])),
        fx.keys.rsa.sign(&claims_with(&[
            ("exp", json!(now - 120)),
            ("iat", json!(now - 400)),
            ("nbf", json!(now - 400)),
        ])),
    ] {
        let mut stream = fx.dial_from_runner(target)?;
        let (status, message) = authenticate(&mut stream, &token)?;
        ensure!(status == 1, "denied: {message}");
    }
    Ok(())
}

fn admitted(fx: &AuthFixture, token: &str, up: u64, down: u64) -> Result<std::net::TcpStream> {
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, token)?;
    ensure!(status == 0, "admitted: {message}");
    op::exchange(&mut stream, up, down)?;
    Ok(stream)
}

fn metrics(fx: &AuthFixture) -> Result<Exposition> {
    let text = scrape_unix(&fx.admin_socket())?;
    Ok(parse(&text)?)
}

#[test]
fn metrics_count_the_traffic_the_test_sent() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = sized_server(&fx.topo)?;
    send_denials(&fx)?;
    let token = fx.token();
    let sizes = [(10_000u64, 250_000u64), (333_333, 17), (16, 1)];
    let mut streams = Vec::new();
    for (up, down) in sizes {
        streams.push(admitted(&fx, &token, up, down)?);
    }
    let live = streams.pop().context("third session")?;
    streams.into_iter().for_each(op::close);
    wait_events(&fx.agent, "session_close", 2)?;
    wait_events(&fx.agent, "connection_denied", 5)?;
    let m = metrics(&fx)?;
    let (up, down) = sizes
        .iter()
        .fold((0, 0), |(u, d), (up, down)| (u + up, d + down));
    let kernel = |direction| {
        m.value(
            "tcpgate_bytes_total",
            &[("direction", direction), ("path", "kernel")],
        )
    };
    ensure!(
        kernel("up") == Some(up as f64) && kernel("down") == Some(down as f64),
        "kernel bytes up {:?} (sent {up}), down {:?} (sent {down})",
        kernel("up"),
        kernel("down")
    );
    ensure!(m.value("tcpgate_sessions_live", &[]) == Some(1.0), "live");
    ensure!(
        m.value("tcpgate_grants_live", &[]) == Some(1.0),
        "the live session's grant"
    );
    ensure!(m.value("tcpgate_connections_accepted_total", &[]) == Some(3.0));
    for (reason, n) in [
        ("bad_magic", 2.0),
        ("timeout", 1.0),
        ("no_rule_matched", 1.0),
        ("token_expired", 1.0),
    ] {
        let got = m.count("tcpgate_connections_denied_total", &[("reason", reason)]);
        ensure!(got == n, "denied {reason}: {got}, expected {n}");
    }
    let denied_total: f64 = m
        .samples
        .iter()
        .filter(|s| s.name == "tcpgate_connections_denied_total")
        .map(|s| s.value)
        .sum();
    ensure!(denied_total == 5.0, "no other denial: {denied_total}");
    let count = |name: &str, result| m.count(name, &[("result", result)]);
    ensure!(count("tcpgate_auth_duration_seconds_count", "admitted") == 3.0);
    ensure!(count("tcpgate_auth_duration_seconds_count", "denied") == 5.0);
    ensure!(count("tcpgate_upstream_connect_duration_seconds_count", "ok") == 3.0);
    ensure!(
        m.count(
            "tcpgate_sessions_closed_total",
            &[("reason", "client_closed")]
        ) == 2.0
    );
    ensure!(m.value("tcpgate_datapath", &[("datapath", "ebpf")]) == Some(1.0));
    ensure!(m.value("tcpgate_datapath", &[("datapath", "userspace")]) == Some(0.0));
    ensure!(m.value("tcpgate_ebpf_redirect_failures_total", &[]) == Some(0.0));
    // Eight connections were intercepted (a retransmitted SYN counts again).
    let steered = m.count("tcpgate_ebpf_lookups_steered_total", &[]);
    ensure!(steered >= 8.0, "intercepted SYNs: {steered}");

    // A grant that expires under a live session: its teardown is measured.
    op::close(live);
    let short = fx
        .keys
        .rsa
        .sign(&claims_with(&[("exp", json!(unix_now() + 3))]));
    let mut expiring = admitted(&fx, &short, 100, 200)?;
    ensure!(op::ended(&mut expiring), "expiry ends the session");
    let closed = wait_events(&fx.agent, "session_close", 4)?;
    ensure!(closed[3]["reason"] == "grant_expired", "{}", closed[3]);
    let m = metrics(&fx)?;
    ensure!(m.value("tcpgate_expiry_teardown_seconds_count", &[]) == Some(1.0));
    ensure!(m.value("tcpgate_sessions_live", &[]) == Some(0.0));
    ensure!(
        kernel_total(&m, "up") == (up + 100) as f64,
        "closed sessions keep their bytes"
    );
    ensure!(kernel_total(&m, "down") == (down + 200) as f64);
    drop(expiring);
    server.stop()?;
    Ok(())
}

fn kernel_total(m: &Exposition, direction: &str) -> f64 {
    m.count(
        "tcpgate_bytes_total",
        &[("direction", direction), ("path", "kernel")],
    )
}
