//! Routed grants (`[intercept.routed_grants]`): a granted source's flows
//! are forwarded, not terminated. Byte exactness both ways with the
//! kernel's counters, half-close, server-first, expiry and revocation
//! (RSTs both ways, nothing after), fail-closed for sources without a
//! grant and forged marks, the kernel deadline without the agent, and the
//! `max_flows` bound.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use tcpgate_tests::auth_fixture::{AuthFixture, echo_service};
use tcpgate_tests::metrics::{parse, scrape_unix};
use tcpgate_tests::routed::{
    DialOptions, dial_v4, ensure_reset_both_ends, exchange_half_closed, routed_fixture,
    up_then_wait_for_reset,
};
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::topology::RUNNER_V4;
use tcpgate_tests::{
    Payload, Signal, eventually, pinned_entries, require_root, serve_once, wait_events,
    write_payload,
};

const PORT: u16 = 9000;
/// The routed mark the fixture configures (the default).
const ROUTED_MARK: u32 = 0x7452;

/// A grant for the runner whose token expires at `exp` (unix seconds).
fn grant_until(fx: &AuthFixture, exp: u64) -> Result<String> {
    let token = fx.keys.rsa.sign(&claims_with(&[("exp", json!(exp))]));
    fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])
}

/// The one FLOWS entry's value, as bpftool prints it with BTF.
fn flow_value(fx: &AuthFixture) -> Result<Value> {
    let entries = pinned_entries(fx.agent.pin_dir(), "flows")?;
    ensure!(entries.len() == 1, "one routed flow: {entries:?}");
    Ok(entries[0]["formatted"]["value"].clone())
}

#[test]
fn byte_exact_both_ways_half_close_counted_in_flows() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let (up, down) = (Payload::new(1, 8 << 20), Payload::new(2, 3 << 20));
    let peer = exchange_half_closed(&fx, PORT, up, down)?;
    // Routed, not terminated: the target sees the runner itself.
    ensure!(peer.ip() == IpAddr::V4(RUNNER_V4), "target saw {peer}");
    let open = &wait_events(&fx.agent, "session_open", 1)?[0];
    ensure!(open["datapath"] == "routed", "{open}");
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["datapath"] == "routed"
            && closed["kernel_bytes_up"] == up.len
            && closed["kernel_bytes_down"] == down.len
            && closed["reason"] == "client_closed",
        "FLOWS counters against the payload: {closed}"
    );
    ensure!(
        pinned_entries(fx.agent.pin_dir(), "flows")?.is_empty(),
        "the flow is removed after linger"
    );
    // The agent's session metrics count it like any session.
    eventually(
        Duration::from_secs(10),
        "routed bytes in tcpgate_bytes_total",
        || -> Result<bool> {
            let m = parse(&scrape_unix(&fx.admin_socket())?)?;
            let bytes = |d| {
                m.count(
                    "tcpgate_bytes_total",
                    &[("direction", d), ("path", "routed")],
                )
            };
            Ok(bytes("up") == up.len as f64
                && bytes("down") == down.len as f64
                && m.count("tcpgate_connections_accepted_total", &[]) == 1.0
                && m.count(
                    "tcpgate_sessions_closed_total",
                    &[("reason", "client_closed")],
                ) == 1.0
                && m.count("tcpgate_sessions_live", &[]) == 0.0)
        },
    )?;
    Ok(())
}

#[test]
fn server_speaks_first() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let server = echo_service(&fx, b"HELLO\n")?;
    fx.grant_from_runner(&fx.token(), &[])?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(PORT))?;
    let mut greeting = [0u8; 6];
    stream.read_exact(&mut greeting)?;
    ensure!(&greeting == b"HELLO\n", "greeting");
    stream.write_all(b"ping")?;
    let mut back = [0u8; 4];
    stream.read_exact(&mut back)?;
    ensure!(&back == b"ping", "echo");
    drop(stream);
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["datapath"] == "routed" && closed["bytes_up"] == 4 && closed["bytes_down"] == 10,
        "{closed}"
    );
    let peers = server.stop()?;
    ensure!(
        peers.len() == 1 && peers[0].ip() == IpAddr::V4(RUNNER_V4),
        "{peers:?}"
    );
    Ok(())
}

/// At expiry (and at revocation) the agent resets both ends with the
/// tracked sequence numbers; nothing of the flow passes afterwards.
#[test]
fn expiry_and_revocation_reset_both_ends() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let admin = fx.admin_socket().display().to_string();
    for (round, revoke) in [(1, false), (2, true)] {
        let token = fx.keys.rsa.sign(&claims_with(&[
            ("exp", json!(unix_now() + if revoke { 600 } else { 3 })),
            ("jti", json!(format!("job-{round}"))),
        ]));
        let grant = fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])?;
        let target = up_then_wait_for_reset(&fx, PORT)?;
        let mut stream = fx.dial_from_runner(AuthFixture::target(PORT))?;
        let mut first = [0u8; 2];
        stream.read_exact(&mut first)?;
        if revoke {
            let (status, out, err) =
                fx.cli(&fx.topo.bastion, &["revoke", "--admin", &admin, &grant])?;
            ensure!(status == 0, "revoke: {out} {err}");
        }
        ensure_reset_both_ends(&fx, &mut stream, target, &format!("round {round}"))?;
        let closed = &wait_events(&fx.agent, "session_close", round)?[round - 1];
        let reason = if revoke { "revoked" } else { "grant_expired" };
        ensure!(
            closed["reason"] == reason && closed["grant_id"] == grant.as_str(),
            "{closed}"
        );
    }
    Ok(())
}

/// Without a grant, a runner's SYN is intercepted (and refused without a
/// preamble). A mark set by a runner never reaches the bastion (it is
/// cleared crossing into another namespace, as on a wire); what can carry
/// the routed mark is a socket on the bastion itself, and the guard's
/// output chain does not honour it: that connection is intercepted too.
#[test]
fn no_grant_or_a_forged_mark_is_intercepted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let server = echo_service(&fx, b"")?;
    for (round, forged) in [(1, false), (2, true)] {
        let target = AuthFixture::target(PORT);
        let from = if forged {
            &fx.topo.bastion
        } else {
            &fx.topo.runner
        };
        let mut stream = from.run(move || dial_marked(target, forged))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.write_all(b"not a preamble")?;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        ensure!(rest.is_empty(), "round {round}: nothing came back");
        wait_events(&fx.agent, "connection_denied", round)?;
    }
    ensure!(server.stop()?.is_empty(), "the target saw no connection");
    let opened = fx
        .agent
        .audit_events()?
        .into_iter()
        .filter(|e| e["event"] == "session_open")
        .count();
    ensure!(opened == 0, "no session");
    Ok(())
}

/// A connection from a socket carrying the routed mark when `forged`.
fn dial_marked(target: SocketAddr, forged: bool) -> Result<TcpStream> {
    let mark = forged.then_some(ROUTED_MARK);
    dial_v4(target, DialOptions { mark, local: None })
}

/// The agent dies: the programs stay, and end the flow at its deadline.
#[test]
fn killed_agent_flow_still_ends_at_its_deadline() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut fx = routed_fixture("")?;
    let exp = unix_now() + 4;
    grant_until(&fx, exp)?;
    let server = serve_once(&fx.topo.target, AuthFixture::target(PORT), |mut s, _| {
        let mut got = Vec::new();
        let _ = s.set_read_timeout(Some(Duration::from_secs(8)));
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    })?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(PORT))?;
    stream.write_all(b"before")?;
    eventually(
        Duration::from_secs(10),
        "the bytes counted",
        || -> Result<bool> { Ok(flow_value(&fx)?["bytes_up"] == 6) },
    )?;
    fx.agent.signal(Signal::SIGKILL)?;
    fx.agent.wait_exit(Duration::from_secs(10))?;
    let deadline = std::time::UNIX_EPOCH + Duration::from_secs(exp);
    if let Ok(left) = deadline.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left + Duration::from_millis(200));
    }
    let _ = stream.write_all(b"after");
    eventually(
        Duration::from_secs(10),
        "the kernel ended the flow",
        || -> Result<bool> {
            let flow = flow_value(&fx)?;
            Ok(flow["state"] == 3 && flow["dropped"].as_u64().unwrap_or(0) > 0)
        },
    )?;
    let got = server.join()?;
    ensure!(
        got == b"before",
        "nothing passed after the deadline: {:?}",
        String::from_utf8_lossy(&got)
    );
    Ok(())
}

/// `max_flows` bounds FLOWS: granted SYNs beyond it take the intercepting
/// path (admitted there by the same grant).
#[test]
fn max_flows_bounds_the_map() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("max_flows = 3\n")?;
    let server = echo_service(&fx, b"")?;
    fx.grant_from_runner(&fx.token(), &[])?;
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut s = fx.dial_from_runner(AuthFixture::target(PORT))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        streams.push(s);
    }
    let opened = wait_events(&fx.agent, "session_open", 5)?;
    let routed = opened.iter().filter(|e| e["datapath"] == "routed").count();
    ensure!(routed == 3, "3 routed, 2 intercepted: {opened:?}");
    ensure!(
        pinned_entries(fx.agent.pin_dir(), "flows")?.len() == 3,
        "FLOWS holds 3"
    );
    eventually(
        Duration::from_secs(10),
        "the bound in the metrics",
        || -> Result<bool> {
            let m = parse(&scrape_unix(&fx.admin_socket())?)?;
            Ok(m.count("tcpgate_routed_flows_full_total", &[]) >= 2.0
                && m.count("tcpgate_routed_flows", &[]) == 3.0
                && m.count("tcpgate_routed_flows_capacity", &[]) == 3.0)
        },
    )?;
    drop(streams);
    server.stop()?;
    Ok(())
}

/// 1,000 routed flows live at once, each with its own payload echoed back
/// byte-exact, each counted in FLOWS and closed with its own audit line.
#[test]
fn thousand_concurrent_routed_flows() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const FLOWS: usize = 1000;
    const SIZE: u64 = 16 * 1024;
    tcpgate_tests::raise_nofile();
    let fx = routed_fixture("")?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let echo = tcpgate_tests::accept_loop(
        &fx.topo.target,
        AuthFixture::target(PORT),
        FLOWS,
        |mut stream, peer| -> Result<SocketAddr> {
            let mut data = Vec::new();
            stream.read_to_end(&mut data)?;
            stream.write_all(&data)?;
            stream.shutdown(Shutdown::Write)?;
            Ok(peer)
        },
    )?;
    let mut clients = Vec::with_capacity(FLOWS);
    for i in 0..FLOWS {
        let mut client = fx.dial_from_runner(AuthFixture::target(PORT))?;
        write_payload(&mut client, &Payload::new(i as u64, SIZE))?;
        clients.push(client);
    }
    let opened = wait_events(&fx.agent, "session_open", FLOWS)?;
    ensure!(
        opened.iter().all(|e| e["datapath"] == "routed"),
        "every flow routed"
    );
    ensure!(
        pinned_entries(fx.agent.pin_dir(), "flows")?.len() == FLOWS,
        "all live together in FLOWS"
    );
    eventually(
        Duration::from_secs(10),
        "tcpgate_sessions_live counts the routed flows",
        || -> Result<bool> {
            let m = parse(&scrape_unix(&fx.admin_socket())?)?;
            Ok(m.count("tcpgate_sessions_live", &[]) == FLOWS as f64)
        },
    )?;
    tcpgate_tests::payload::check_echoed(&mut clients, SIZE)?;
    let peers = echo.stop()?.into_iter().collect::<Result<Vec<_>>>()?;
    ensure!(
        peers.iter().all(|p| p.ip() == IpAddr::V4(RUNNER_V4)),
        "not terminated"
    );
    let closed = wait_events(&fx.agent, "session_close", FLOWS)?;
    for event in &closed {
        ensure!(
            event["kernel_bytes_up"] == SIZE && event["kernel_bytes_down"] == SIZE,
            "{event}"
        );
    }
    Ok(())
}
