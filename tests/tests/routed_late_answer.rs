//! A target that answers only a retransmission of the runner's SYN (it
//! dropped the first, as a full listen queue does): the agent takes an
//! unanswered flow as finished after `linger`, but an answer that comes
//! before its entry is removed brings it back. Before, the entry was
//! removed anyway, `linger` later, under the now established connection,
//! and the intercepting path reset it.

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, policy};
use tcpgate_tests::routed::{
    dial_from_runner_port, echo_three, ensure_reset_both_ends, routed_launch_lingering,
    three_byte_echo, up_then_wait_for_reset,
};
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::{require_root, wait_events};

const PORT: u16 = 9000;
const SOURCE_PORT: u16 = 40_321;

/// Drops SYNs to `PORT` in the target's namespace (removed with it).
const DROP_SYNS: &str = "add table inet late; add chain inet late input { type filter hook input priority 0; }; add rule inet late input tcp dport 9000 tcp flags & (syn | ack) == syn drop";

/// Routed grants whose flows are taken as unanswered after 800 ms and
/// removed 800 ms after the agent saw that: the runner retransmits its SYN
/// after 1 s, inside that window. Both tests' timing rests on it.
fn late_answer_fixture() -> Result<AuthFixture> {
    let launch = routed_launch_lingering("800ms", "poll_interval = \"20ms\"");
    AuthFixture::start_launched(&policy("15m"), &[], launch)
}

#[test]
fn a_flow_answered_after_it_was_taken_as_unanswered_is_kept() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = late_answer_fixture()?;
    let _server = three_byte_echo(&fx, PORT)?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let mut stream = dial_answered_late(&fx)?;
    // Past the removal the unanswered flow was due for.
    std::thread::sleep(Duration::from_millis(2500));
    echo_three(&mut stream, b"two").context("the late-answered connection")?;
    // The runner's FIN: closed by both ends.
    drop(stream);
    let opened = wait_events(&fx.agent, "session_open", 1)?;
    let closed = wait_events(&fx.agent, "session_close", 1)?;
    ensure!(opened[0]["datapath"] == "routed", "routed: {opened:?}");
    // Both ends' FINs (the runner's counts as the closer), every byte
    // counted by the tc programs: never ended as unanswered.
    ensure!(
        closed[0]["datapath"] == "routed"
            && closed[0]["kernel_bytes_up"] == 3
            && closed[0]["kernel_bytes_down"] == 3
            && closed[0]["reason"] == "client_closed",
        "one session, closed by its ends with every byte: {closed:?}"
    );
    Ok(())
}

/// Dials the target from `SOURCE_PORT` with the first SYN dropped in the
/// target: the connection is answered only by the retransmission, 1 s
/// later, after the agent took the flow as unanswered (linger 800 ms).
fn dial_answered_late(fx: &AuthFixture) -> Result<TcpStream> {
    fx.topo.target.exec_ok(&["nft", DROP_SYNS])?;
    let target = AuthFixture::target(PORT);
    std::thread::scope(|scope| -> Result<TcpStream> {
        let dial = scope.spawn(|| {
            fx.topo
                .runner
                .run(move || dial_from_runner_port(SOURCE_PORT, target))
        });
        // The first SYN has been dropped; the retransmission passes.
        std::thread::sleep(Duration::from_millis(400));
        fx.topo
            .target
            .exec_ok(&["nft", "delete", "table", "inet", "late"])?;
        let stream = dial.join().expect("the dial thread")?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(stream)
    })
}

/// A flow brought back by a late answer is a live flow like any other:
/// when its grant expires the agent ends it, an RST to each end, and its
/// close line says `grant_expired`.
#[test]
fn a_late_answered_flow_is_ended_when_its_grant_expires() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = late_answer_fixture()?;
    // The grant ends with its token, 5 to 6 s from now: well after the
    // late answer (about 1 s after the dial) and after the removal it
    // escaped (about 1.6 s after), with room for a slow grant call.
    let token = fx
        .keys
        .rsa
        .sign(&claims_with(&[("exp", json!(unix_now() + 6))]));
    fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])?;
    let target = up_then_wait_for_reset(&fx, PORT)?;
    let mut stream = dial_answered_late(&fx)?;
    let mut first = [0u8; 2];
    stream
        .read_exact(&mut first)
        .context("the late-answered connection")?;
    ensure_reset_both_ends(&fx, &mut stream, target, "at expiry")?;
    let closed = wait_events(&fx.agent, "session_close", 1)?;
    ensure!(
        closed.len() == 1
            && closed[0]["reason"] == "grant_expired"
            && closed[0]["kernel_bytes_down"] == 2,
        "one session, ended by its grant's expiry: {closed:?}"
    );
    Ok(())
}
