//! A runner's SYN on a 4-tuple the bastion itself still holds (a
//! TIME_WAIT left by a connection the intercepting path terminated) is not
//! routed, though a grant covers it: the intercepting path takes it
//! (docs/routed.md, "A 4-tuple the bastion still holds"). A binary of its
//! own: run beside `routed_reuse`'s two tests, it made the first of them
//! fail its second dial (EADDRNOTAVAIL) every time.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::AuthFixture;
use tcpgate_tests::preamble::{encode, read_answer};
use tcpgate_tests::routed::{dial_from_runner_port, echo_three, routed_fixture, three_byte_echo};
use tcpgate_tests::topology::RUNNER_V4;
use tcpgate_tests::{eventually, pinned_entries, require_root, wait_events};

const PORT: u16 = 9000;
const SOURCE_PORT: u16 = 40_123;

/// Whether the bastion holds `RUNNER_V4:SOURCE_PORT -> target` in TIME_WAIT.
fn bastion_time_wait(fx: &AuthFixture, target: SocketAddr) -> Result<bool> {
    let listed = fx
        .topo
        .bastion
        .exec_ok(&["ss", "-Htan", "state", "time-wait"])?;
    let runner = format!("{RUNNER_V4}:{SOURCE_PORT}");
    let target = target.to_string();
    Ok(listed
        .lines()
        .any(|l| l.contains(&runner) && l.contains(&target)))
}

/// A runner's SYN on a 4-tuple the bastion still holds in TIME_WAIT (left
/// by an intercepted connection the bastion closed first) is not routed,
/// though a grant covers it: routed, its packets would meet that TIME_WAIT
/// and the connection would hang (docs/routed.md). The intercepting path
/// takes it and the grant admits it, byte-exact both ways.
#[test]
fn a_tuple_the_bastion_holds_in_time_wait_is_not_routed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    // The target closes first, so the agent closes its side to the runner
    // first: the bastion's socket ends in TIME_WAIT, the runner's does not.
    let _server = three_byte_echo(&fx, PORT)?;
    // A bounded hang: a SYN that is never answered fails within ~15 s.
    fx.topo.runner.sysctl("net.ipv4.tcp_syn_retries", "3")?;
    let target = AuthFixture::target(PORT);
    let token = fx.token();
    // No grant yet: the preamble makes the intercepting path terminate it.
    let preamble = encode(&token);
    let mut first = fx
        .topo
        .runner
        .run(move || dial_from_runner_port(SOURCE_PORT, target))?;
    first.set_read_timeout(Some(Duration::from_secs(10)))?;
    first.write_all(&preamble)?;
    let (status, message) = read_answer(&mut first)?;
    ensure!(status == 0, "the agent admits the preamble: {message}");
    echo_three(&mut first, b"one").context("the intercepted first connection")?;
    drop(first);
    eventually(
        Duration::from_secs(10),
        "the bastion holds the 4-tuple in TIME_WAIT",
        || bastion_time_wait(&fx, target),
    )?;
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["datapath"] != "routed",
        "first intercepted: {closed}"
    );

    fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])?;
    ensure!(
        bastion_time_wait(&fx, target)?,
        "the TIME_WAIT outlives the grant"
    );
    let mut second = fx
        .topo
        .runner
        .run(move || dial_from_runner_port(SOURCE_PORT, target))
        .context("dial again on the 4-tuple the bastion holds in TIME_WAIT")?;
    second.set_read_timeout(Some(Duration::from_secs(10)))?;
    // While it is open: the tc program opened no routed flow for it.
    let flows = pinned_entries(fx.agent.pin_dir(), "flows")?;
    ensure!(flows.is_empty(), "no routed flow: {flows:?}");
    echo_three(&mut second, b"two").context("the second connection, same 4-tuple")?;
    drop(second);
    let opened = wait_events(&fx.agent, "session_open", 2)?;
    ensure!(
        opened
            .iter()
            .all(|e| matches!(e["datapath"].as_str(), Some("ebpf" | "userspace"))),
        "both intercepted: {opened:?}"
    );
    let closed = wait_events(&fx.agent, "session_close", 2)?;
    ensure!(
        closed[1]["datapath"] != "routed"
            && closed[1]["bytes_up"] == 3
            && closed[1]["bytes_down"] == 3,
        "the second intercepted, byte-exact: {:?}",
        closed[1]
    );
    Ok(())
}
