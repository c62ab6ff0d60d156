//! SIGUSR2 (what the upgrade sequence sends under systemd): the agent
//! starts its own successor, which takes over; the old agent hands it the
//! service manager's main pid and drains.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tcpgate_tests::takeover::{
    SteppedTransfer, agent_lines, check_digest, duplex_upstream, echo_once, wait_taken_over,
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
    let read = transfer.finish()?;
    check_digest("download", read, &down)?;
    check_digest("upload", server.join()??, &up)?;
    let close = tcpgate_tests::wait_events(&fx.agent, "session_close", 1)?;
    ensure!(close[0]["handover"] == "drained", "{}", close[0]);
    assert_bytes_with(DataPath::Ebpf, &close[0], up.len, down.len, true)?;
    let status = fx
        .agent
        .wait_exit(Duration::from_secs(60))?
        .context("the old agent exits once drained")?;
    ensure!(status.success(), "{status:?}\n{}", fx.agent.logs_tail(20));
    // The successor serves, then stops cleanly and removes its pins.
    echo_once(&fx, b"after").with_context(|| fx.agent.logs_tail(30))?;
    successor.stop()?;
    ensure!(!pin_dir.exists(), "the successor removed its pins on stop");
    Ok(())
}
