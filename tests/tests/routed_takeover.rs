//! Routed flows across takeovers: the tc filters outlive the agent, and a
//! successor carries the open flows of the pinned `FLOWS` over into its
//! own before its programs replace the old ones. A flow streams through
//! two takeovers byte-exact both ways, is never reset, and the last
//! agent's close line counts every byte in the kernel and says `adopted`;
//! `tcpgate sessions` lists it under one id throughout, counters growing.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, policy};
use tcpgate_tests::operator::sessions_json;
use tcpgate_tests::routed::routed_launch;
use tcpgate_tests::takeover::{
    SteppedTransfer, agent_lines, check_digest, duplex_server, log_field, log_line, successor,
    wait_taken_over,
};
use tcpgate_tests::{Payload, require_root, wait_events};

const PORT: u16 = 9000;
const MIB: u64 = 1 << 20;

#[test]
fn a_routed_flow_streams_through_two_takeovers() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut fx = AuthFixture::start_launched(
        &policy("15m"),
        &[],
        Launch {
            agent_extra: agent_lines(dir.path()),
            ..routed_launch("")
        },
    )?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let (up, down) = (Payload::new(31, 48 * MIB), Payload::new(32, 40 * MIB));
    let server = duplex_server(&fx.topo.target, AuthFixture::target(PORT), down)?;
    let stream = fx.dial_from_runner(AuthFixture::target(PORT))?;
    let transfer = SteppedTransfer::start(stream, up, down.len, 3)?;
    let mut old = None;
    let mut agents = Vec::new();
    let mut listed = Vec::new();
    for round in 1..=2 {
        transfer.wait_checkpoint()?;
        listed.push(routed_row(&fx)?);
        let previous = old.as_ref().unwrap_or(&fx.agent);
        let next = successor(&fx.topo.bastion, fx.agent.config_path(), &[], &[])?;
        wait_taken_over(previous).with_context(|| format!("takeover {round}"))?;
        let carried = log_line(&next, "routed flows of the previous agent carried over");
        ensure!(
            carried.as_deref().and_then(|l| log_field(l, "flows")) == Some("1"),
            "takeover {round}: {}",
            next.logs_tail(20)
        );
        // Listed by the successor's map at once, under the same id.
        listed.push(routed_row(&fx)?);
        transfer.resume();
        if let Some(previous) = old.replace(next) {
            agents.push(previous);
        }
    }
    ensure!(
        listed
            .windows(2)
            .all(|w| w[0].0 == w[1].0 && w[0].1 <= w[1].1)
            && listed[0].1 < listed[3].1,
        "tcpgate sessions lists the flow under one id, its counters growing: {listed:?}"
    );
    let got_down = transfer.finish()?;
    check_digest("down", got_down, &down)?;
    check_digest("up", server.join()??, &up)?;
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["datapath"] == "routed"
            && closed["reason"] == "client_closed"
            && closed["handover"] == "adopted"
            && closed["kernel_bytes_up"] == up.len
            && closed["kernel_bytes_down"] == down.len,
        "the last agent's FLOWS counts every byte: {closed}"
    );
    for mut agent in agents.into_iter().chain(old) {
        let _ = agent.stop();
    }
    let status = fx.agent.wait_exit(Duration::from_secs(30))?;
    ensure!(
        status.is_some_and(|s| s.success()),
        "the first agent exits once taken over: {status:?}\n{}",
        fx.agent.logs_tail(20)
    );
    Ok(())
}

/// The one routed row of `tcpgate sessions --json`: its id and the bytes
/// both ways.
fn routed_row(fx: &AuthFixture) -> Result<(String, u64)> {
    let doc = sessions_json(fx.agent.binary(), fx.agent.pin_dir())?;
    let rows: Vec<&Value> = doc["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["datapath"] == "routed")
        .collect();
    ensure!(rows.len() == 1, "one routed session: {doc}");
    let bytes =
        rows[0]["bytes_up"].as_u64().unwrap_or(0) + rows[0]["bytes_down"].as_u64().unwrap_or(0);
    Ok((
        rows[0]["session_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        bytes,
    ))
}
