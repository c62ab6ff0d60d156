//! The agent learns of routed flows from the tc programs' `FLOW_EVENTS`
//! ring, not only from reading `FLOWS` now and then: a flow that starts,
//! ends and is replaced on its 4-tuple between two polls still gets its own
//! audit lines and exact counts (a whole read every poll missed it). A
//! granted runner flooding the ring (reusing one 4-tuple as fast as it
//! can) only costs records: they are counted, the agent reads `FLOWS`
//! whole, every line it writes balances, and later flows are exact. A
//! flow lives through a reload, and its grant's expiry after it still ends
//! it with its exact counts.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tcpgate_tests::auth_fixture::AuthFixture;
use tcpgate_tests::routed::{
    echo_three, ensure_reset_both_ends, redial_from_runner_port, routed_fixture, routed_polls,
    three_byte_echo, up_then_wait_for_reset,
};
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::topology::RUNNER_V4;
use tcpgate_tests::{Signal, eventually, require_root, wait_events};

const PORT: u16 = 9000;

/// The routed audit lines of `kind` from the runner's `source_port`.
fn lines_from(fx: &AuthFixture, kind: &str, source_port: u16) -> Result<Vec<Value>> {
    let source = format!("{RUNNER_V4}:{source_port}");
    Ok(fx
        .agent
        .audit_events()?
        .into_iter()
        .filter(|e| e["event"] == kind && e["datapath"] == "routed" && e["source"] == *source)
        .collect())
}

/// Waits for `n` open and `n` close lines from `source_port`.
fn wait_lines(fx: &AuthFixture, source_port: u16, n: usize) -> Result<(Vec<Value>, Vec<Value>)> {
    eventually(
        Duration::from_secs(30),
        &format!("{n} routed sessions from port {source_port} opened and closed"),
        || -> Result<_> {
            let opened = lines_from(fx, "session_open", source_port)?;
            let closed = lines_from(fx, "session_close", source_port)?;
            Ok((opened.len() >= n && closed.len() >= n).then_some((opened, closed)))
        },
    )
}

fn routed_metric(fx: &AuthFixture, name: &str) -> Result<f64> {
    let text = tcpgate_tests::metrics::scrape_unix(&fx.admin_socket())?;
    Ok(tcpgate_tests::metrics::parse(&text)?.count(name, &[]))
}

#[test]
fn a_flow_opened_and_replaced_between_two_polls_has_its_own_lines() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // A poll every 5 s: both flows start and end between two polls.
    let fx = routed_fixture("poll_interval = \"5s\"")?;
    let _server = three_byte_echo(&fx, PORT)?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let target = AuthFixture::target(PORT);
    // A poll may still fall between the two flows: then try another port.
    for source_port in 40_200..40_203 {
        let polls = routed_polls(&fx)?;
        for message in [b"one", b"two"] {
            let mut stream = redial_from_runner_port(&fx, source_port, target)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            echo_three(&mut stream, message).with_context(|| format!("port {source_port}"))?;
        }
        let between_polls = routed_polls(&fx)? == polls;
        let (opened, closed) = wait_lines(&fx, source_port, 2)?;
        ensure!(
            opened.len() == 2 && closed.len() == 2,
            "one open and one close line each: {opened:?} {closed:?}"
        );
        ensure!(
            opened[0]["session_id"] != opened[1]["session_id"],
            "two sessions: {opened:?}"
        );
        for line in &closed {
            ensure!(
                line["kernel_bytes_up"] == 3 && line["kernel_bytes_down"] == 3,
                "each flow's own final counts: {line}"
            );
        }
        if between_polls {
            ensure!(
                routed_metric(&fx, "tcpgate_routed_events_lost_total")? == 0.0,
                "nothing lost: the lines came from the records"
            );
            return Ok(());
        }
    }
    anyhow::bail!("a poll fell between the two flows three times out of three")
}

#[test]
fn a_granted_runner_flooding_the_ring_loses_records_not_the_gate() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // One flow slot: the ring is one page (about 34 records); 30 reuses of
    // one 4-tuple write about 120 (open, answer, a FIN each way), most of
    // them between two polls.
    let fx = routed_fixture("poll_interval = \"5s\"\nmax_flows = 1")?;
    let _server = three_byte_echo(&fx, PORT)?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let target = AuthFixture::target(PORT);
    let flood_port = 40_300;
    for round in 0..30 {
        let mut stream = redial_from_runner_port(&fx, flood_port, target)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        echo_three(&mut stream, b"abc").with_context(|| format!("round {round}"))?;
    }
    eventually(
        Duration::from_secs(30),
        "records lost and counted",
        || -> Result<_> {
            Ok((routed_metric(&fx, "tcpgate_routed_events_lost_total")? > 0.0).then_some(()))
        },
    )?;
    // The agent read FLOWS whole: every flow it opened a line for is
    // closed, none counted more bytes than it moved.
    let (opened, closed) = eventually(
        Duration::from_secs(30),
        "every routed flow the agent saw closed",
        || -> Result<_> {
            let opened = lines_from(&fx, "session_open", flood_port)?;
            let closed = lines_from(&fx, "session_close", flood_port)?;
            Ok((!opened.is_empty() && closed.len() == opened.len()).then_some((opened, closed)))
        },
    )?;
    ensure!(opened.len() <= 30, "no flow twice: {}", opened.len());
    for line in &closed {
        ensure!(
            line["kernel_bytes_up"].as_u64() <= Some(3)
                && line["kernel_bytes_down"].as_u64() <= Some(3),
            "never more than the flow moved: {line}"
        );
    }
    // The flows recorded before the ring filled, and the last one (found by
    // the whole read), closed with their exact counts.
    ensure!(
        closed
            .iter()
            .any(|l| l["kernel_bytes_up"] == 3 && l["kernel_bytes_down"] == 3),
        "exact counts from the records and the whole read: {closed:?}"
    );
    // The gate goes on: the next flow (its slot free again) is routed,
    // with its lines and exact counts.
    let port = 40_301;
    let mut stream = redial_from_runner_port(&fx, port, target)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    echo_three(&mut stream, b"xyz")?;
    drop(stream);
    let (_, closed) = wait_lines(&fx, port, 1)?;
    ensure!(
        closed[0]["kernel_bytes_up"] == 3 && closed[0]["kernel_bytes_down"] == 3,
        "exact after the flood: {}",
        closed[0]
    );
    Ok(())
}

#[test]
fn a_flow_lives_through_a_reload_and_its_grant_expiry_still_ends_it() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut fx = routed_fixture("")?;
    let token = fx
        .keys
        .rsa
        .sign(&claims_with(&[("exp", json!(unix_now() + 10))]));
    let grant = fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])?;
    let target = up_then_wait_for_reset(&fx, PORT)?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(PORT))?;
    let mut first = [0u8; 2];
    stream.read_exact(&mut first)?;
    stream.write_all(b"ping")?;
    fx.agent.signal(Signal::SIGHUP)?;
    fx.agent
        .wait_for_log("reloaded the policy", Duration::from_secs(20))?;
    stream.write_all(b"pong")?;
    ensure_reset_both_ends(&fx, &mut stream, target, "at expiry")?;
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["datapath"] == "routed"
            && closed["reason"] == "grant_expired"
            && closed["grant_id"] == grant.as_str()
            && closed["kernel_bytes_up"] == 8
            && closed["kernel_bytes_down"] == 2,
        "one flow, ended by its grant, every byte counted: {closed}"
    );
    let opened = wait_events(&fx.agent, "session_open", 1)?;
    ensure!(opened.len() == 1, "no second open line: {opened:?}");
    Ok(())
}
