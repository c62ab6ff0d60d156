//! Upgrading a running bastion: after the files are in place, a takeover
//! (`systemctl reload`: the unit's supervisor starts the new binary as a
//! successor that takes the listeners and grants over; live sessions drain
//! in the old agent). Waits until the successor serves, or says why not.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::layout::UNIT;
use crate::cmd;

/// How long the successor may take to be ready.
const READY_BOUND: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// What the installed unit runs as its main process.
const SUPERVISE: &str = "--supervise";

/// The status text the supervisor sets while a successor starts, and when
/// it failed (see proxy-userspace/src/supervise).
const STARTING: &str = "starting a successor";
const FAILED: &str = "takeover failed";

/// Reloads the running service into the files just installed, if any
/// changed (`changed`), and waits for the new agent.
pub fn reload(changed: bool) -> Result<()> {
    if !changed {
        println!("install: {UNIT} is running; nothing changed ... not reloaded");
        return Ok(());
    }
    let main = property("MainPID")?;
    let cmdline = std::fs::read(format!("/proc/{main}/cmdline")).unwrap_or_default();
    if !cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == SUPERVISE.as_bytes())
    {
        println!(
            "install: {UNIT} still runs the unit from before `run --supervise` (pid {main}), \
             which cannot take the new build over: restart it once, \
             `systemctl restart {UNIT}` (this ends its live sessions); \
             later installs upgrade it keeping them ... not reloaded"
        );
        return Ok(());
    }
    let before = agents(&main);
    let status_before = property("StatusText")?;
    cmd::run(Command::new("systemctl").args(["reload", UNIT]))?;
    let deadline = Instant::now() + READY_BOUND;
    let mut successor = None;
    loop {
        let status = property("StatusText")?;
        if status.starts_with(FAILED) && (successor.is_some() || status != status_before) {
            bail!(
                "install: {UNIT}: {status}. The files are installed but the old agent \
                 keeps serving; see `journalctl -u {UNIT}`"
            );
        }
        if successor.is_none() {
            successor = agents(&main).into_iter().find(|pid| !before.contains(pid));
        }
        if let Some(pid) = &successor
            && property("ActiveState")? == "active"
            && !status.starts_with(STARTING)
            && std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            println!(
                "install: {UNIT} reloaded: the new agent (pid {pid}) serves; \
                 the old one drains its live sessions ({status})"
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "install: {UNIT}: the new agent was not ready within {}s ({status}); \
                 see `journalctl -u {UNIT}`",
                READY_BOUND.as_secs()
            );
        }
        std::thread::sleep(POLL);
    }
}

fn property(name: &str) -> Result<String> {
    let value = cmd::read(Command::new("systemctl").args(["show", "--value", "-p", name, UNIT]))?;
    Ok(value.trim().to_owned())
}

/// The supervisor's children (the agents).
fn agents(main: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{main}/task/{main}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}
