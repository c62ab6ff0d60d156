//! Takeover (`tcpgate run --takeover`): the running agent hands its
//! listeners, grants, pins and interception to a successor; the successor
//! adopts the user-space sessions and the old agent drains the kernel-path
//! ones; nothing is refused and no byte is lost. A takeover gone wrong is
//! in takeover_faults.rs.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::operator as op;
use tcpgate_tests::takeover::{
    SteppedTransfer, check_digest, duplex_upstream, echo_once, exits_by_itself, forward_fixture,
    successor, wait_taken_over,
};
use tcpgate_tests::topology::BASTION_RUNNER_V4;
use tcpgate_tests::{
    Agent, DataPath, ForwardFixture, LISTEN_PORT, Payload, accept_loop, assert_bytes_with,
    eventually,
};

const GIB: u64 = 1 << 30;
const EXIT_WAIT: Duration = Duration::from_secs(60);

tcpgate_tests::on_every_path!(
    a_transfer_each_way_survives_three_takeovers,
    a_differing_state_version_drains,
    new_connections_during_takeovers_are_all_accepted,
);

/// A 1 GiB transfer each way stops at three checkpoints; at each one the
/// agent is replaced. On the kernel path the session stays with the agent
/// that accepted it (drained), which exits once it ends; on the user-space
/// path each successor adopts it (same id, counters going on). Both
/// SHA-256 match, and the audit line proves the path (the eBPF map's
/// counters on the kernel path).
fn a_transfer_each_way_survives_three_takeovers(path: DataPath) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut fx = forward_fixture(path, dir.path())?;
    let (up, down) = (Payload::new(11, GIB), Payload::new(12, GIB));
    let server = duplex_upstream(&fx, down)?;
    let transfer = SteppedTransfer::start(fx.dial()?, up, GIB, 4)?;
    let mut agents: Vec<Agent> = Vec::new();
    let mut listed: Option<(u64, u64)> = None;
    let mut id: Option<String> = None;
    for round in 0..3 {
        transfer.wait_checkpoint().with_context(|| fx.dump())?;
        let prev = agents.last().unwrap_or(&fx.agent);
        let next = successor(
            &fx.topo.bastion,
            prev.config_path(),
            &["--datapath", path.flag()],
            &[],
        )?;
        wait_taken_over(prev).with_context(|| format!("round {round}"))?;
        agents.push(next);
        // `tcpgate sessions` still lists it under the same id, draining in
        // the first agent (kernel path: the pinned map), or as the
        // successor's own (user-space path: its operator socket), with
        // counters grown by the last leg.
        let (listed_id, counters) = match path {
            // Long spliced on the copy-first path too.
            DataPath::Ebpf | DataPath::CopyFirst => drained_counters(&fx)?,
            // Listed from the adoption on; its counters from when its
            // relay runs again.
            DataPath::Userspace => eventually(
                Duration::from_secs(20),
                "the successor lists the adopted session's counters",
                || -> Result<Option<(String, (u64, u64))>> {
                    let (listed_id, counters) = adopted_counters(&fx)?;
                    Ok((counters.0 > 0).then_some((listed_id, counters)))
                },
            )?,
        };
        ensure!(
            id.get_or_insert_with(|| listed_id.clone()) == &listed_id,
            "round {round}: the session keeps its id: {id:?} then {listed_id}"
        );
        if let Some(before) = listed {
            ensure!(
                counters.0 > before.0 && counters.1 > before.1,
                "counters grow: {before:?} then {counters:?}"
            );
        }
        listed = Some(counters);
        transfer.resume();
    }
    let (read, digest) = transfer.finish().with_context(|| fx.dump())?;
    check_digest("download", (read, digest), &Payload::new(12, GIB))?;
    check_digest("upload", server.join()??, &up)?;
    let close = tcpgate_tests::wait_events(&fx.agent, "session_close", 1)?;
    let handover = match path {
        DataPath::Ebpf | DataPath::CopyFirst => "drained",
        DataPath::Userspace => "adopted",
    };
    ensure!(close[0]["handover"] == handover, "{}", close[0]);
    ensure!(
        id.as_deref().is_some_and(|id| close[0]["session_id"] == id),
        "the listed id is the audit line's: {id:?} {}",
        close[0]
    );
    assert_bytes_with(path, &close[0], GIB, GIB, true)?;
    // Each replaced agent exits by itself once its sessions are gone.
    exits_by_itself(&mut fx.agent, "first agent still running")?;
    for old in &mut agents[..2] {
        exits_by_itself(old, "replaced agent still running")?;
    }
    // The last successor serves, on the same path.
    echo_once(&fx, b"after")?;
    let events = tcpgate_tests::wait_events(&fx.agent, "session_close", 2)?;
    ensure!(events[1]["handover"].is_null(), "{}", events[1]);
    tcpgate_tests::assert_bytes(path, &events[1], 5, 1)?;
    let mut last = agents.pop().context("successor")?;
    last.stop()?;
    drop(agents);
    Ok(())
}

/// The one session `tcpgate sessions` lists as draining in the fixture's
/// (first) agent: its id and (bytes up, bytes down).
fn drained_counters(fx: &ForwardFixture) -> Result<(String, (u64, u64))> {
    let doc = op::sessions_json(fx.agent.binary(), fx.agent.pin_dir())?;
    let pid = u64::from(fx.agent.pid());
    let rows: Vec<&serde_json::Value> = doc["sessions"]
        .as_array()
        .context("sessions")?
        .iter()
        .filter(|s| s["draining_agent_pid"].as_u64() == Some(pid))
        .collect();
    ensure!(rows.len() == 1, "one session draining in pid {pid}: {doc}");
    id_and_counters(rows[0])
}

/// The one session `tcpgate sessions` lists for a forward-only user-space
/// agent (nothing pinned): the operator socket of the agent that adopted
/// it last, which every agent sharing the configuration binds in turn.
fn adopted_counters(fx: &ForwardFixture) -> Result<(String, (u64, u64))> {
    let config = fx.agent.config_path();
    let doc = op::sessions_json_with(
        fx.agent.binary(),
        [OsStr::new("--config"), config.as_os_str()],
    )?;
    let rows = doc["sessions"].as_array().context("sessions")?;
    ensure!(rows.len() == 1, "one adopted session: {doc}");
    ensure!(
        rows[0]["datapath"] == "userspace"
            && rows[0]["listed_by"] == serde_json::json!(["operator_socket"]),
        "{doc}"
    );
    id_and_counters(&rows[0])
}

fn id_and_counters(row: &serde_json::Value) -> Result<(String, (u64, u64))> {
    let field = |name: &str| row[name].as_u64().context("counter");
    let id = row["session_id"].as_str().context("session_id")?;
    Ok((id.to_owned(), (field("bytes_up")?, field("bytes_down")?)))
}

/// A successor whose state version differs adopts nothing: the live
/// session drains in the old agent, byte-exact, and both logs say why.
fn a_differing_state_version_drains(path: DataPath) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut fx = forward_fixture(path, dir.path())?;
    let (up, down) = (Payload::new(21, 64 << 20), Payload::new(22, 64 << 20));
    let server = duplex_upstream(&fx, down)?;
    let transfer = SteppedTransfer::start(fx.dial()?, up, down.len, 2)?;
    transfer.wait_checkpoint()?;
    let mut next = successor(
        &fx.topo.bastion,
        fx.agent.config_path(),
        &["--datapath", path.flag()],
        &[("TCPGATE_TEST_TAKEOVER_STATE_VERSION", "999")],
    )?;
    wait_taken_over(&fx.agent)?;
    ensure!(
        next.logs().contains("state versions differ"),
        "{}",
        next.logs_tail(20)
    );
    ensure!(
        fx.agent
            .logs()
            .lines()
            .any(|l| l.contains("a successor asks to take over") && l.contains("999")),
        "{}",
        fx.agent.logs_tail(20)
    );
    let read = transfer.finish()?;
    check_digest("download", read, &down)?;
    check_digest("upload", server.join()??, &up)?;
    let close = tcpgate_tests::wait_events(&fx.agent, "session_close", 1)?;
    ensure!(close[0]["handover"] == "drained", "{}", close[0]);
    assert_bytes_with(path, &close[0], up.len, down.len, true)?;
    ensure!(fx.agent.wait_exit(EXIT_WAIT)?.is_some_and(|s| s.success()));
    next.stop()?;
    Ok(())
}

/// A client dials in a loop (bounded in count) while the agent is replaced
/// three times: every connection is accepted and answered, none refused
/// or reset, since both agents accept from the same listening sockets.
fn new_connections_during_takeovers_are_all_accepted(path: DataPath) -> Result<()> {
    const MAX_DIALS: u64 = 20_000;
    let dir = tempfile::tempdir()?;
    let fx = forward_fixture(path, dir.path())?;
    let upstream = accept_loop(
        &fx.topo.target,
        fx.upstream_addr(),
        MAX_DIALS as usize,
        |mut s, _| {
            let mut byte = [0u8; 1];
            if s.read_exact(&mut byte).is_ok() {
                let _ = s.write_all(&byte);
            }
        },
    )?;
    let (running, dials) = (AtomicBool::new(true), AtomicU64::new(0));
    let addr = SocketAddr::from((BASTION_RUNNER_V4, LISTEN_PORT));
    let mut agents: Vec<Agent> = Vec::new();
    std::thread::scope(|scope| -> Result<()> {
        let dialer = scope.spawn(|| -> Result<()> {
            while running.load(Ordering::Acquire) && dials.load(Ordering::Acquire) < MAX_DIALS {
                let n = dials.load(Ordering::Acquire);
                let mut s = tcpgate_tests::dial(&fx.topo.runner, addr)
                    .with_context(|| format!("dial {n}"))?;
                s.write_all(b"x")?;
                let mut byte = [0u8; 1];
                s.read_exact(&mut byte)
                    .with_context(|| format!("answer to dial {n}"))?;
                dials.fetch_add(1, Ordering::AcqRel);
            }
            Ok(())
        });
        let replaced = replace_three_times(&fx, path, &dials, &mut agents);
        running.store(false, Ordering::Release);
        let dialed = dialer
            .join()
            .map_err(|_| anyhow::anyhow!("dialer panicked"))?;
        replaced.and(dialed)
    })?;
    drop(upstream);
    for agent in agents.iter_mut().rev() {
        agent.stop()?;
    }
    Ok(())
}

/// Replaces the agent three times while the dialer runs, then lets the
/// last one answer a few more.
fn replace_three_times(
    fx: &ForwardFixture,
    path: DataPath,
    dials: &AtomicU64,
    agents: &mut Vec<Agent>,
) -> Result<()> {
    for _ in 0..3 {
        let before = dials.load(Ordering::Acquire);
        tcpgate_tests::eventually(Duration::from_secs(30), "the dialer makes progress", || {
            dials.load(Ordering::Acquire) > before
        })?;
        let prev = agents.last().unwrap_or(&fx.agent);
        let next = successor(
            &fx.topo.bastion,
            prev.config_path(),
            &["--datapath", path.flag()],
            &[],
        )?;
        wait_taken_over(prev)?;
        agents.push(next);
    }
    let before = dials.load(Ordering::Acquire);
    tcpgate_tests::eventually(Duration::from_secs(30), "the last agent answers", || {
        dials.load(Ordering::Acquire) > before + 10
    })?;
    Ok(())
}
