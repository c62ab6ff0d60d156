//! Copy first, splice after (`agent.splice_after_bytes`): the agent copies
//! a session's first bytes itself and hands it to the kernel once they
//! have passed. Short sessions never enter the SOCKHASH; long ones do, and
//! no byte is lost, repeated or reordered at the hand-over, whichever way
//! the bytes flow at that moment. Each test checks SHA-256 digests on both
//! ends and the audit line's counters (the kernel's come from the session
//! map).

use std::collections::BTreeSet;
use std::io::Read;
use std::net::Shutdown;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, authenticate, policy, streamer};
use tcpgate_tests::operator::{self as op, sessions_json_with};
use tcpgate_tests::payload::read_until_end;
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::{DataPath, ForwardFixture, Signal, wait_events};
use tcpgate_tests::{
    Digest, Payload, read_exact_hashed, read_to_end_hashed, require_root, serve_once, write_payload,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The budget the forward tests give the agent.
const BUDGET: u64 = 64 * KIB;

fn counter(event: &Value, name: &str) -> Result<u64> {
    event[name]
        .as_u64()
        .with_context(|| format!("{name} missing: {event}"))
}

fn fixture() -> Result<ForwardFixture> {
    ForwardFixture::start_tuned(
        DataPath::Ebpf,
        &format!("splice_after_bytes = {BUDGET}"),
        "",
    )
}

/// One end of [`duplex`]: sends `out` while it reads `incoming` bytes,
/// then half-closes and waits for the peer's EOF. Neither end closes
/// before both transfers are complete, so whether the session reaches the
/// kernel depends on the byte counts alone. Returns the digest read.
fn both_ways(stream: std::net::TcpStream, out: Payload, incoming: u64) -> Result<Digest> {
    let mut writer = stream.try_clone()?;
    let sending = std::thread::spawn(move || write_payload(&mut writer, &out));
    let mut reader = stream;
    let digest = read_exact_hashed(&mut reader, incoming)?;
    sending.join().expect("writer thread")?;
    reader.shutdown(Shutdown::Write)?;
    let (more, _) = read_to_end_hashed(&mut reader)?;
    ensure!(more == 0, "{more} bytes more than sent");
    Ok(digest)
}

/// The client sends `up` bytes while the server sends `down`. Checks both
/// digests.
fn duplex(fx: &ForwardFixture, seed: u64, up: u64, down: u64) -> Result<()> {
    let request = Payload::new(seed, up);
    let reply = Payload::new(seed + 1, down);
    let server = serve_once(&fx.topo.target, fx.upstream_addr(), move |stream, _| {
        both_ways(stream, reply, up).context("the server's end")
    })?;
    let got = both_ways(fx.dial()?, request, down).context("the client's end")?;
    let upstream_got = server.join()??;
    ensure!(
        upstream_got == Payload::new(seed, up).digest(),
        "upstream got other bytes"
    );
    ensure!(
        got == Payload::new(seed + 1, down).digest(),
        "client got other bytes"
    );
    Ok(())
}

/// A session that ends within the budget is copied; one that passes it
/// moves the rest in the kernel, counted in the session map.
#[test]
fn short_sessions_stay_copied_and_long_ones_are_spliced() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = fixture()?;
    let cases = [
        (0, 0, "userspace"),
        (KIB, 3 * KIB, "userspace"),
        (BUDGET / 2 - 1, BUDGET / 2 - 1, "userspace"),
        (8 * MIB, 0, "ebpf"),
        (0, 8 * MIB, "ebpf"),
        (8 * MIB, 8 * MIB, "ebpf"),
        (BUDGET, 16 * MIB, "ebpf"),
    ];
    for (i, &(up, down, datapath)) in cases.iter().enumerate() {
        duplex(&fx, 100 + 10 * i as u64, up, down)
            .with_context(|| format!("case up={up} down={down}\n{}", fx.dump()))?;
        let closed = &fx.wait_closed(i + 1)?[i];
        ensure!(
            counter(closed, "bytes_up")? == up && counter(closed, "bytes_down")? == down,
            "case {i}: byte counts {closed}"
        );
        ensure!(closed["datapath"] == datapath, "case {i}: {closed}");
        let copied =
            counter(closed, "userspace_bytes_up")? + counter(closed, "userspace_bytes_down")?;
        let kernel = counter(closed, "kernel_bytes_up")? + counter(closed, "kernel_bytes_down")?;
        if datapath == "userspace" {
            ensure!(kernel == 0 && copied == up + down, "case {i}: {closed}");
        } else {
            // The agent copied at least the budget before the hand-over,
            // and the kernel moved bytes after it.
            ensure!(copied >= BUDGET && kernel > 0, "case {i}: {closed}");
        }
    }
    fx.assert_maps_empty()
}

/// A peer that half-closes within the budget keeps the session with the
/// agent to its end (the kernel takes only sockets open both ways), and
/// the server's long answer still arrives whole.
#[test]
fn a_session_half_closed_within_the_budget_is_copied_to_its_end() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = fixture()?;
    let (up, down) = (KIB, 4 * MIB);
    fx.half_close_exchange(Payload::new(7, up), Payload::new(8, down))?;
    let closed = &fx.wait_closed(1)?[0];
    ensure!(
        closed["datapath"] == "userspace"
            && counter(closed, "userspace_bytes_up")? == up
            && counter(closed, "userspace_bytes_down")? == down,
        "{closed}"
    );
    fx.assert_maps_empty()
}

/// While the agent still copies a session, its grant's expiry and its
/// revocation end it as they end a spliced one.
#[test]
fn expiry_and_revocation_end_a_session_still_copied() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // A budget no stream of this test reaches.
    let launch = Launch {
        agent_extra: "splice_after_bytes = 1073741824".into(),
        ..Launch::default()
    };
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    let server = streamer(&fx, Duration::from_secs(60))?;
    let admin = fx.admin_socket().display().to_string();
    // Revoked first, then a new job's grant expires.
    let exp = unix_now() + 5;
    let rounds = [
        ("job-1", None, "revoked"),
        ("job-2", Some(exp), "grant_expired"),
    ];
    for (round, (jti, exp, reason)) in rounds.into_iter().enumerate() {
        let mut claims = vec![("jti", json!(jti))];
        if let Some(exp) = exp {
            claims.push(("exp", json!(exp)));
        }
        let token = fx.keys.rsa.sign(&claims_with(&claims));
        let grant = fx.grant_from_runner(&token, &[])?;
        let mut stream = fx.dial_from_runner(AuthFixture::target(5432))?;
        let mut first = [0u8; 1024];
        stream.read_exact(&mut first)?;
        if exp.is_none() {
            // Listed with live counters while the agent copies it (the
            // operator endpoint; its pinned record counts nothing yet).
            let doc = sessions_json_with(fx.agent.binary(), ["--admin", admin.as_str()])?;
            let rows = doc["sessions"].as_array().context("sessions")?;
            ensure!(
                rows.len() == 1 && rows[0]["bytes_down"].as_u64() >= Some(1024),
                "{doc:#}"
            );
            let (status, stdout, stderr) =
                fx.cli(&fx.topo.bastion, &["revoke", "--admin", &admin, &grant])?;
            ensure!(status == 0, "revoke: {status} {stdout} {stderr}");
        }
        let (received, _) = read_until_end(&mut stream);
        let closed = &wait_events(&fx.agent, "session_close", round + 1)?[round];
        ensure!(
            closed["reason"] == reason && closed["datapath"] == "userspace",
            "round {round}: {closed}"
        );
        ensure!(
            counter(closed, "kernel_bytes_down")? == 0
                && received <= counter(closed, "userspace_bytes_down")?,
            "round {round}: the client got {received} bytes: {closed}"
        );
    }
    server.stop()?;
    tcpgate_tests::assert_maps_empty(fx.agent.pin_dir())?;
    Ok(())
}

/// A granted client's target that speaks first and long: the agent relays
/// the first bytes of its greeting itself, up to a limit that may cut a
/// segment, and the kernel must not send the part the agent took again.
#[test]
fn a_greeting_cut_at_the_relay_limit_arrives_once() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const GREETING: u64 = 256 * KIB;
    let fx = AuthFixture::start()?;
    let server = tcpgate_tests::accept_loop(
        &fx.topo.target,
        AuthFixture::target(9000),
        1,
        |mut stream, _| -> Result<()> {
            write_payload(&mut stream, &Payload::new(5, GREETING))?;
            let (more, _) = read_to_end_hashed(&mut stream)?;
            ensure!(more == 0, "the client sent {more} bytes");
            Ok(())
        },
    )?;
    fx.grant_from_runner(&fx.token(), &[])?;
    let mut client = fx.dial_from_runner(AuthFixture::target(9000))?;
    let digest = read_exact_hashed(&mut client, GREETING)?;
    ensure!(
        digest == Payload::new(5, GREETING).digest(),
        "the greeting changed"
    );
    client.shutdown(Shutdown::Write)?;
    let (more, _) = read_to_end_hashed(&mut client)?;
    ensure!(
        more == 0,
        "{more} bytes after the greeting: some came twice"
    );
    for result in server.stop()? {
        result?;
    }
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["bytes_down"] == GREETING && closed["datapath"] == "ebpf",
        "{closed}"
    );
    Ok(())
}

/// With the agent stopped (SIGSTOP: its API never answers), the sessions it
/// is still copying are listed from the pinned map, and `tcpgate revoke
/// --subject` ends them there: their clients' sockets are destroyed at
/// once, and the agent, running again, ends the upstream side and records
/// them revoked. One session came in with a preamble, the other with a
/// source grant of the same subject, and a reload passed while both were
/// copied.
#[test]
fn sessions_still_copied_are_listed_and_revoked_through_the_pinned_maps() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let launch = Launch {
        agent_extra: "splice_after_bytes = 1073741824".into(),
        ..Launch::default()
    };
    let mut fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    let server = op::sized_server(&fx.topo)?;
    let subject = claims_with(&[])["sub"].as_str().context("sub")?.to_owned();
    let mut preambled = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut preambled, &fx.token())?;
    ensure!(status == 0, "preamble: {status} {message}");
    op::exchange(&mut preambled, 1_000, 2_000)?;
    let second = fx.keys.rsa.sign(&claims_with(&[("jti", json!("job-2"))]));
    let grant = fx.grant_from_runner(&second, &[])?;
    let mut granted = fx.dial_from_runner(AuthFixture::target(9000))?;
    op::exchange(&mut granted, 3_000, 4_000)?;
    let mut sessions = vec![preambled, granted];
    let clients: BTreeSet<String> = sessions
        .iter()
        .map(|s| Ok(s.local_addr()?.to_string()))
        .collect::<Result<_>>()?;
    fx.agent.signal(Signal::SIGHUP)?;
    fx.agent
        .wait_for_log("reloaded the policy", Duration::from_secs(20))?;
    let pin = fx.agent.pin_dir().to_str().context("utf-8")?.to_owned();
    let admin = fx.admin_socket().display().to_string();
    let offline = ["--admin", &admin, "--api-timeout", "1s", "--pin-dir", &pin];
    fx.agent.signal(Signal::SIGSTOP)?;
    let _resume = op::Continue(fx.agent.pid());

    let doc = sessions_json_with(fx.agent.binary(), offline)?;
    let rows = doc["sessions"].as_array().context("sessions")?;
    let listed: BTreeSet<String> = rows
        .iter()
        .filter(|r| r["datapath"] == "userspace" && r["subject"] == subject.as_str())
        .filter_map(|r| r["client"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        rows.len() == 2
            && listed == clients
            && rows.iter().any(|r| r["grant_id"] == grant.as_str())
            && rows.iter().any(|r| r["auth"] == "preamble"),
        "both copied sessions listed from the pinned map: {doc:#}"
    );
    let mut args = vec!["revoke", "--subject", &subject];
    args.extend(offline);
    let (status, stdout, stderr) =
        op::run(op::cli_in(&fx.topo.bastion, fx.agent.binary(), &args)?)?;
    ensure!(
        status == 0
            && stdout
                .matches("through the pinned map, 1 session(s) ended")
                .count()
                == 2
            && stdout.contains("2 of 2 socket(s) destroyed")
            && stdout.contains("2 of these session(s) the agent was copying"),
        "revoke through the pinned maps ({status}):\n{stdout}\n{stderr}"
    );
    for stream in &mut sessions {
        ensure!(
            op::ended(stream),
            "the client is cut off while the agent is stopped"
        );
    }

    fx.agent.signal(Signal::SIGCONT)?;
    let closed = wait_events(&fx.agent, "session_close", 2)?;
    for event in &closed {
        ensure!(
            event["reason"] == "revoked"
                && event["subject"] == subject.as_str()
                && event["datapath"] == "userspace",
            "{event}"
        );
    }
    ensure!(
        closed.iter().any(|e| e["grant_id"] == grant.as_str()),
        "the source grant's session: {closed:?}"
    );
    let ends = server.stop()?;
    ensure!(ends.len() == 2, "the upstream sides ended too: {ends:?}");
    tcpgate_tests::assert_maps_empty(fx.agent.pin_dir())?;
    Ok(())
}
