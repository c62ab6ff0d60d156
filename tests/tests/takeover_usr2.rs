//! SIGUSR2 (what the upgrade sequence sends under systemd): the agent
//! starts its own successor, which takes over; the old agent hands it the
//! service manager's main pid and drains. Under `run --supervise` the
//! supervisor starts it instead and stays the main process.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tcpgate_tests::takeover::{
    SteppedTransfer, agent_lines, check_digest, duplex_upstream, echo_once, exits_by_itself,
    stops_cleanly, wait_taken_over,
};
use tcpgate_tests::{
    DataPath, ForwardFixture, Payload, Signal, assert_bytes_with, eventually, require_root,
};

/// A successor the old agent started (not the testkit): SIGTERM and a
/// bounded wait for its exit on drop.
struct Started(Pid);

impl Started {
    fn stop(&self) -> Result<()> {
        kill(self.0, Signal::SIGTERM)?;
        eventually(Duration::from_secs(30), "the successor exits", || {
            kill(self.0, None).is_err()
        })?;
        Ok(())
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The transfer ends byte-exact both ways, drained in the old agent, every
/// byte counted by the kernel path.
fn drained_byte_exact(
    fx: &ForwardFixture,
    transfer: SteppedTransfer,
    server: tcpgate_tests::OneShot<Result<(u64, tcpgate_tests::Digest)>>,
    up: Payload,
    down: Payload,
) -> Result<()> {
    let read = transfer.finish()?;
    check_digest("download", read, &down)?;
    check_digest("upload", server.join()??, &up)?;
    let close = tcpgate_tests::wait_events(&fx.agent, "session_close", 1)?;
    ensure!(close[0]["handover"] == "drained", "{}", close[0]);
    assert_bytes_with(DataPath::Ebpf, &close[0], up.len, down.len, true)?;
    Ok(())
}

#[test]
fn sigusr2_starts_a_successor_that_takes_over_while_a_session_drains() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut fx = ForwardFixture::start_tuned(DataPath::Ebpf, &agent_lines(dir.path()), "")?;
    let pin_dir = fx.agent.pin_dir().to_owned();
    let (up, down) = (Payload::new(31, 64 << 20), Payload::new(32, 64 << 20));
    let server = duplex_upstream(&fx, down)?;
    let transfer = SteppedTransfer::start(fx.dial()?, up, down.len, 2)?;
    transfer.wait_checkpoint()?;
    fx.agent.signal(Signal::SIGUSR2)?;
    wait_taken_over(&fx.agent)?;
    let notify = fx.agent.notify();
    let pid = eventually(
        Duration::from_secs(30),
        "MAINPID= from the old agent",
        || {
            let _ = notify.poll();
            notify.messages().iter().find_map(|m| {
                m.strip_prefix("MAINPID=")
                    .and_then(|p| p.parse::<i32>().ok())
            })
        },
    )?;
    let successor = Started(Pid::from_raw(pid));
    ensure!(
        pid != i32::try_from(fx.agent.pid())?,
        "the main pid moved to the successor"
    );
    drained_byte_exact(&fx, transfer, server, up, down)?;
    exits_by_itself(&mut fx.agent, "the old agent exits once drained")?;
    // The successor serves, then stops cleanly and removes its pins.
    echo_once(&fx, b"after").with_context(|| fx.agent.logs_tail(30))?;
    successor.stop()?;
    ensure!(!pin_dir.exists(), "the successor removed its pins on stop");
    Ok(())
}

/// The agents `tcpgate run --supervise` (the unit's main process) runs.
fn agents_of(supervisor: u32) -> Result<Vec<u32>> {
    let path = format!("/proc/{supervisor}/task/{supervisor}/children");
    let listed = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    Ok(listed
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Once the log says `why`, `serving` is still the supervisor's only agent.
fn still_serving(fx: &ForwardFixture, serving: &[u32], why: &str) -> Result<()> {
    fx.agent.wait_for_log(why, Duration::from_secs(30))?;
    let agents = agents_of(fx.agent.pid())?;
    ensure!(
        agents == serving,
        "{why}: agents {agents:?}, not {serving:?}"
    );
    Ok(())
}

/// What the supervisor relayed to the service manager so far.
fn relayed(fx: &ForwardFixture) -> Vec<String> {
    let _ = fx.agent.notify().poll();
    fx.agent.notify().messages()
}

/// Under `run --supervise` (what the unit runs), SIGUSR2 to the
/// supervisor starts a successor as its child: the session in flight
/// drains byte-exact in the old agent, which then exits; the supervisor
/// stays (the service's main process), never relays `MAINPID=`, and its
/// `RELOADING=1` ends with the successor's `READY=1`. A successor that
/// fails (here: a broken config) leaves the serving agent serving. SIGTERM
/// stops everything cleanly, pins removed.
#[test]
fn sigusr2_under_the_supervisor_keeps_it_the_main_process() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut fx = ForwardFixture::start_run(
        DataPath::Ebpf,
        &agent_lines(dir.path()),
        "",
        &["--supervise"],
    )?;
    let supervisor = fx.agent.pid();
    let pin_dir = fx.agent.pin_dir().to_owned();
    let first = agents_of(supervisor)?;
    ensure!(
        first.len() == 1,
        "one agent under the supervisor: {first:?}"
    );
    let (up, down) = (Payload::new(41, 64 << 20), Payload::new(42, 64 << 20));
    let server = duplex_upstream(&fx, down)?;
    let transfer = SteppedTransfer::start(fx.dial()?, up, down.len, 2)?;
    transfer.wait_checkpoint()?;
    let before = relayed(&fx).len();
    fx.agent.signal(Signal::SIGUSR2)?;
    wait_taken_over(&fx.agent)?;
    eventually(
        Duration::from_secs(30),
        "the successor's READY=1 relayed",
        || {
            let new = relayed(&fx).split_off(before);
            new.iter()
                .position(|m| m.starts_with("RELOADING=1"))
                .is_some_and(|r| new[r..].iter().any(|m| m.lines().any(|l| l == "READY=1")))
        },
    )?;
    drained_byte_exact(&fx, transfer, server, up, down)?;
    let successor = eventually(Duration::from_secs(60), "the old agent exits", || {
        agents_of(supervisor)
            .ok()
            .filter(|a| a.len() == 1 && a[0] != first[0])
    })?;
    echo_once(&fx, b"after").with_context(|| fx.agent.logs_tail(30))?;

    // A successor that cannot start (bad config) changes nothing.
    let config = fx.agent.config_path().to_owned();
    let good = std::fs::read_to_string(&config)?;
    std::fs::write(&config, format!("{good}\n[agent.typo]\n"))?;
    fx.agent.signal(Signal::SIGUSR2)?;
    still_serving(
        &fx,
        &successor,
        "takeover failed: the successor exited before it was ready",
    )?;
    ensure!(
        relayed(&fx)
            .iter()
            .any(|m| m.contains("STATUS=takeover failed")),
        "the unit's status says so"
    );
    echo_once(&fx, b"still").with_context(|| fx.agent.logs_tail(30))?;
    std::fs::write(&config, good)?;
    // SIGUSR2 to the agent itself: successors are the supervisor's to start.
    kill(Pid::from_raw(i32::try_from(successor[0])?), Signal::SIGUSR2)?;
    still_serving(&fx, &successor, "SIGUSR2 ignored: this agent is supervised")?;
    ensure!(
        !relayed(&fx).iter().any(|m| m.contains("MAINPID=")),
        "the supervisor stays the main process: {:?}",
        relayed(&fx)
    );

    stops_cleanly(&mut fx.agent)?;
    ensure!(
        kill(Pid::from_raw(i32::try_from(successor[0])?), None).is_err(),
        "the agent stopped with its supervisor"
    );
    ensure!(!pin_dir.exists(), "the agent removed its pins on stop");
    Ok(())
}

/// A successor that took the listeners and then died before it was ready
/// (here: held before READY by a test hook, then SIGKILLed) leaves no agent
/// serving, while the old one drains a kernel-path session. The supervisor
/// stops the taken-over agent and exits with the successor's status, so
/// systemd's `Restart=on-failure` brings the service back, instead of
/// waiting for a drain while nothing accepts.
#[test]
fn a_successor_dying_after_it_took_over_stops_the_service_with_a_failure() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let agent = format!(
        "takeover_socket = {:?}\ntakeover_timeout = \"2s\"\nshutdown_grace = \"1s\"\n",
        dir.path().join("takeover.sock").display().to_string()
    );
    let mut fx = ForwardFixture::start_run_env(
        DataPath::Ebpf,
        &agent,
        "",
        &["--supervise"],
        &[("TCPGATE_TEST_TAKEOVER_STALL", "ready")],
    )?;
    let supervisor = fx.agent.pid();
    let first = agents_of(supervisor)?;
    let (up, down) = (Payload::new(51, 8 << 20), Payload::new(52, 8 << 20));
    let _server = duplex_upstream(&fx, down)?;
    let transfer = SteppedTransfer::start(fx.dial()?, up, down.len, 2)?;
    transfer.wait_checkpoint()?;
    fx.agent.signal(Signal::SIGUSR2)?;
    wait_taken_over(&fx.agent)?;
    fx.agent
        .wait_for_log("never reporting ready", Duration::from_secs(30))?;
    let successor = eventually(Duration::from_secs(10), "the successor", || {
        agents_of(supervisor)
            .ok()
            .and_then(|a| a.into_iter().find(|p| !first.contains(p)))
    })?;
    kill(Pid::from_raw(i32::try_from(successor)?), Signal::SIGKILL)?;
    let status = fx
        .agent
        .wait_exit(Duration::from_secs(60))?
        .context("the supervisor exits once no agent serves")?;
    ensure!(
        status.code() == Some(128 + 9),
        "the successor's status, a failure: {status:?}\n{}",
        fx.agent.logs_tail(20)
    );
    ensure!(
        relayed(&fx).iter().any(|m| m.contains("no agent serves")),
        "the unit's status says why: {:?}",
        relayed(&fx)
    );
    ensure!(
        first
            .iter()
            .all(|p| kill(Pid::from_raw(*p as i32), None).is_err()),
        "the taken-over agent stopped too"
    );
    transfer.resume();
    let _ = transfer.finish();
    Ok(())
}
