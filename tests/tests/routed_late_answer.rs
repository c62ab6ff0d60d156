//! A target that answers only a retransmission of the runner's SYN (it
//! dropped the first, as a full listen queue does): the agent takes an
//! unanswered flow as finished after `linger`, but an answer that comes
//! before its entry is removed brings it back. Before, the entry was
//! removed anyway, `linger` later, under the now established connection,
//! and the intercepting path reset it.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::{AuthFixture, policy};
use tcpgate_tests::routed::{
    dial_from_runner_port, echo_three, routed_launch_lingering, three_byte_echo,
};
use tcpgate_tests::{require_root, wait_events};

const PORT: u16 = 9000;
const SOURCE_PORT: u16 = 40_321;

/// Drops SYNs to `PORT` in the target's namespace (removed with it).
const DROP_SYNS: &str = "add table inet late; add chain inet late input { type filter hook input priority 0; }; add rule inet late input tcp dport 9000 tcp flags & (syn | ack) == syn drop";

#[test]
fn a_flow_answered_after_it_was_taken_as_unanswered_is_kept() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Unanswered after 800 ms; removed 800 ms after the agent saw that.
    // The runner retransmits its SYN after 1 s, inside that window.
    let launch = routed_launch_lingering("800ms", "poll_interval = \"20ms\"");
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    let _server = three_byte_echo(&fx, PORT)?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    fx.topo.target.exec_ok(&["nft", DROP_SYNS])?;
    let target = AuthFixture::target(PORT);
    let answer = std::thread::scope(|scope| -> Result<()> {
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
        let mut stream = dial.join().expect("the dial thread")?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        // Past the removal the unanswered flow was due for.
        std::thread::sleep(Duration::from_millis(2500));
        echo_three(&mut stream, b"two").context("the late-answered connection")
    });
    answer?;
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
