//! The agent's lifecycle with live sessions: SIGTERM ends them with
//! `agent_shutdown` and leaves nothing behind; `keep_pins` keeps the maps
//! for inspection; after SIGKILL the next start cleans up and serves.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::operator::{self as op, open_session, sessions_json, sized_server};
use tcpgate_tests::{Agent, Signal, Topology, require_root};
use tcpgate_tests::{agent_leftovers, routing_leftovers, sk_lookup_links, wait_events};

const EXIT_WAIT: Duration = Duration::from_secs(30);

/// Routing rules and routes, sk_lookup links, and the pin directory.
#[test]
fn sigterm_ends_live_sessions_with_agent_shutdown_and_leaves_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let server = sized_server(&topo)?;
    let builder = Agent::builder(&topo.bastion)?;
    let config = op::config(&builder, "");
    let mut agent = builder
        .config(config)
        .args(["--datapath", "ebpf"])
        .spawn()?;
    let mut streams = vec![
        open_session(&topo, 100, 200)?,
        open_session(&topo, 3_000, 40_000)?,
        open_session(&topo, 500_000, 16)?,
    ];
    let opened = wait_events(&agent, "session_open", 3)?;
    agent.signal(Signal::SIGTERM)?;
    let status = agent
        .wait_exit(EXIT_WAIT)?
        .context("the agent did not exit after SIGTERM")?;
    ensure!(status.success(), "{status:?}\n{}", agent.logs_tail(20));
    for stream in &mut streams {
        ensure!(op::ended(stream), "the client sees its session end");
    }
    let events = agent.audit_events()?;
    let closes: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "session_close")
        .collect();
    ensure!(closes.len() == 3, "one close event per session: {closes:?}");
    let opened_ids: BTreeSet<String> = opened.iter().map(|e| e["session_id"].to_string()).collect();
    let closed_ids: BTreeSet<String> = closes.iter().map(|e| e["session_id"].to_string()).collect();
    ensure!(opened_ids == closed_ids, "{opened_ids:?} vs {closed_ids:?}");
    for close in &closes {
        ensure!(close["reason"] == "agent_shutdown", "{close}");
    }
    let left = agent_leftovers(&topo.bastion, agent.pin_dir())?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    server.stop()?;
    Ok(())
}

#[test]
fn keep_pins_leaves_the_maps_and_the_next_start_removes_them() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let server = sized_server(&topo)?;
    let builder = Agent::builder(&topo.bastion)?;
    let config = op::config(&builder, "keep_pins = true");
    let pin_dir = builder.pin_dir().to_owned();
    let mut kept = builder
        .config(config)
        .args(["--datapath", "ebpf"])
        .spawn()?;
    op::close(open_session(&topo, 1_000, 1_000)?);
    wait_events(&kept, "session_close", 1)?;
    let status = kept.stop()?;
    ensure!(status.success(), "{status:?}");
    ensure!(
        kept.logs().contains("keeping the pinned maps"),
        "{}",
        kept.logs_tail(10)
    );
    for map in ["sessions", "sockets", "grants", "intercept", "stats"] {
        ensure!(pin_dir.join(map).exists(), "{map} kept");
    }
    ensure!(
        routing_leftovers(&topo.bastion)?.is_empty(),
        "routing removed"
    );
    ensure!(sk_lookup_links(&topo.bastion)? == 0, "link detached");
    // The kept maps are readable after the agent is gone.
    let doc = sessions_json(kept.binary(), &pin_dir)?;
    ensure!(
        doc["sessions"].as_array().is_some_and(Vec::is_empty),
        "{doc}"
    );

    let builder = Agent::builder(&topo.bastion)?;
    let config = op::config(&builder, "").replace(
        &format!("{:?}", builder.pin_dir().display().to_string()),
        &format!("{:?}", pin_dir.display().to_string()),
    );
    let mut next = builder
        .config(config)
        .args(["--datapath", "ebpf"])
        .spawn()?;
    ensure!(
        next.logs()
            .contains("removed pins left behind by a previous agent"),
        "{}",
        next.logs_tail(10)
    );
    op::close(open_session(&topo, 2_000, 2_000)?);
    let status = next.stop()?;
    ensure!(status.success(), "{status:?}: {}", next.logs_tail(20));
    let left = agent_leftovers(&topo.bastion, &pin_dir)?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    server.stop()?;
    Ok(())
}

#[test]
fn sigkill_then_restart_cleans_up_and_serves() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let server = sized_server(&topo)?;
    let builder = Agent::builder(&topo.bastion)?;
    let config = op::config(&builder, "");
    let pin_dir = builder.pin_dir().to_owned();
    let mut killed = builder
        .config(config.clone())
        .args(["--datapath", "ebpf"])
        .spawn()?;
    let mut orphan = open_session(&topo, 5_000, 6_000)?;
    killed.signal(Signal::SIGKILL)?;
    killed.wait_exit(EXIT_WAIT)?.context("SIGKILL")?;
    ensure!(
        op::ended(&mut orphan),
        "the dead agent's sockets are closed"
    );
    ensure!(
        !routing_leftovers(&topo.bastion)?.is_empty(),
        "routing left behind"
    );
    ensure!(pin_dir.join("sessions").exists(), "pins left behind");
    let stale = sessions_json(killed.binary(), &pin_dir)?;
    ensure!(
        stale["sessions"].as_array().map(Vec::len) == Some(1),
        "the stale record is still pinned: {stale}"
    );

    let builder = Agent::builder(&topo.bastion)?;
    let restarted = builder
        .config(config)
        .args(["--datapath", "ebpf"])
        .spawn()?;
    let logs = restarted.logs();
    ensure!(
        logs.contains("removed pins left behind by a previous agent")
            && logs.contains("left by a previous agent"),
        "the restart reports what it cleaned:\n{logs}"
    );
    let fresh = open_session(&topo, 7_000, 8_000)?;
    let doc = sessions_json(restarted.binary(), &pin_dir)?;
    let sessions = doc["sessions"].as_array().context("sessions")?;
    ensure!(
        sessions.len() == 1
            && sessions[0]["client"] == fresh.local_addr()?.to_string()
            && sessions[0]["bytes_up"] == 7_000
            && sessions[0]["bytes_down"] == 8_000,
        "only the new session: {doc:#}"
    );
    op::close(fresh);
    drop(restarted);
    let left = agent_leftovers(&topo.bastion, &pin_dir)?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    drop(killed);
    server.stop()?;
    Ok(())
}
