//! Upgrades of the running service: a failed takeover, and `cargo xtask
//! install` of a new build under a live spliced session.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::{Keys, authenticate};
use tcpgate_tests::install::systemd::Container;
use tcpgate_tests::takeover::{SteppedTransfer, check_digest, duplex_server};
use tcpgate_tests::{Payload, Topology, eventually};

const UNIT: &str = "tcpgate.service";

/// The supervisor's children: the agents.
fn agents(container: &Container, main: &str) -> Result<Vec<String>> {
    let path = container.path(&format!("/proc/{main}/task/{main}/children"));
    Ok(std::fs::read_to_string(&path)
        .with_context(|| path.display().to_string())?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// The main process is the supervisor, with one agent serving.
pub fn supervised(container: &Container) -> Result<(String, Vec<String>)> {
    let main = container.property(UNIT, "MainPID")?;
    let cmdline = std::fs::read(container.path(&format!("/proc/{main}/cmdline")))?;
    ensure!(
        cmdline.split(|b| *b == 0).any(|a| a == b"--supervise"),
        "the main process is the supervisor: {}",
        String::from_utf8_lossy(&cmdline)
    );
    let serving = agents(container, &main)?;
    Ok((main, serving))
}

/// With a config the successor refuses (exit 64), `systemctl reload`
/// leaves the old agent serving and says so in the unit's status.
pub fn failed_takeover_keeps_the_old_agent(container: &Container) -> Result<()> {
    let (main, serving) = supervised(container)?;
    container.run(&["systemctl", "reload", UNIT])?;
    container.wait_until("the takeover failed", |c| {
        Ok(c.property(UNIT, "StatusText")?
            .starts_with("takeover failed"))
    })?;
    ensure!(container.property(UNIT, "ActiveState")? == "active");
    ensure!(container.property(UNIT, "MainPID")? == main);
    ensure!(
        agents(container, &main)? == serving,
        "the old agent serves on"
    );
    Ok(())
}

/// `tcpgate sessions --json` run after `prefix` (e.g. setpriv ... --):
/// the sessions, and the output for messages.
pub fn sessions(
    container: &Container,
    prefix: &[&str],
) -> Result<(Vec<serde_json::Value>, String)> {
    let command = [
        prefix,
        &[
            "/usr/local/bin/tcpgate",
            "sessions",
            "--json",
            "--sample",
            "0s",
        ],
    ]
    .concat();
    let listed = container.run(&command)?;
    let doc: serde_json::Value =
        serde_json::from_str(&listed).with_context(|| format!("sessions JSON: {listed}"))?;
    let sessions = doc["sessions"]
        .as_array()
        .context("sessions array")?
        .clone();
    Ok((sessions, listed))
}

/// The session's live byte count (both ways), from `tcpgate sessions`.
fn counted(container: &Container) -> Result<u64> {
    let (sessions, listed) = sessions(container, &[])?;
    ensure!(sessions.len() == 1, "one live session: {listed}");
    let bytes = |key: &str| sessions[0][key].as_u64().unwrap_or_default();
    Ok(bytes("bytes_up") + bytes("bytes_down"))
}

/// `cargo xtask install` of a new build (the same binary plus trailing
/// bytes: another file, still a valid ELF) while a spliced session is in
/// the middle of a transfer each way: the install reloads and waits for
/// the new agent; the supervisor stays the main process; the session
/// drains in the old agent, byte-exact, counted before and after; a second
/// install of the same build does not reload.
pub fn install_upgrades_under_a_live_session(
    topo: &Topology,
    container: &Container,
    keys: &Keys,
) -> Result<()> {
    let (main, old) = supervised(container)?;
    let (up, down) = (Payload::new(51, 48 << 20), Payload::new(52, 48 << 20));
    let target = std::net::SocketAddr::from((tcpgate_tests::topology::TARGET_V4, 22));
    let server = duplex_server(&topo.target, target, down)?;
    let mut stream = topo
        .runner
        .run(|| std::net::TcpStream::connect(("192.0.2.10", 22)))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let token = keys.rsa.sign(&tcpgate_tests::tokens::gitlab_claims());
    let (status, message) = authenticate(&mut stream, &token)?;
    ensure!(status == 0, "denied: {message}");
    let transfer = SteppedTransfer::start(stream, up, down.len, 3)?;
    transfer.wait_checkpoint()?;
    let before = counted(container)?;

    let installed = install_build(container, b"another build")?;
    ensure!(
        installed.contains("tcpgate.service reloaded: the new agent"),
        "install reloads the running service:\n{installed}\n{}",
        container.journal(UNIT)
    );
    ensure!(
        container.property(UNIT, "MainPID")? == main,
        "main pid kept"
    );
    let now = agents(container, &main)?;
    ensure!(
        now.len() == 2 && now.contains(&old[0]),
        "the old agent drains beside the new one: {now:?}"
    );
    let during = counted(container)?;
    transfer.resume();
    transfer.wait_checkpoint()?;
    let after = counted(container)?;
    ensure!(
        before > 0 && during >= before && after > during,
        "the session keeps counting: {before} → {during} → {after}"
    );
    let read = transfer.finish()?;
    check_digest("download", read, &down)?;
    check_digest("upload", server.join()??, &up)?;
    println!("session bytes counted: {before} before the upgrade, {after} after one more leg");

    let new = eventually(Duration::from_secs(30), "the old agent exits", || {
        agents(container, &main)
            .ok()
            .filter(|a| a.len() == 1 && a[0] != old[0])
    })?;
    let again = install_build(container, b"another build")?;
    ensure!(again.contains("not reloaded"), "{again}");
    ensure!(
        agents(container, &main)? == new,
        "a no-op install keeps the agent"
    );
    Ok(())
}

/// `cargo xtask install` of the tested binary plus `mark` at its end (a
/// new build as far as the install can tell; still a valid ELF).
fn install_build(container: &Container, mark: &[u8]) -> Result<String> {
    let next = container.path("/var/tmp/tcpgate-next");
    let mut build = std::fs::read(container.path("/var/tmp/tcpgate"))?;
    build.extend_from_slice(mark);
    tcpgate_tests::write_executable(&next, &build, 0o755)?;
    container.run(&[
        "/var/tmp/xtask",
        "install",
        "--binary",
        "/var/tmp/tcpgate-next",
    ])
}

/// A service still running a unit from before `run --supervise` (here a
/// drop-in with the old ExecStart) is not reloaded by an install: the
/// agent is told to restart once, and keeps running meanwhile.
pub fn pre_supervise_unit_is_told_to_restart(container: &Container) -> Result<()> {
    let dropin = container.path("/etc/systemd/system/tcpgate.service.d/old-unit.conf");
    std::fs::create_dir_all(dropin.parent().context("drop-in directory")?)?;
    std::fs::write(
        &dropin,
        "[Service]\nExecStart=\n\
         ExecStart=/usr/local/bin/tcpgate run --config /etc/tcpgate/tcpgate.toml\n",
    )?;
    container.run(&["systemctl", "daemon-reload"])?;
    container.run(&["systemctl", "restart", UNIT])?;
    let main = container.property(UNIT, "MainPID")?;
    let installed = install_build(container, b"a third build")?;
    std::fs::remove_file(&dropin)?;
    container.run(&["systemctl", "daemon-reload"])?;
    ensure!(
        installed.contains("still runs the unit from before `run --supervise`")
            && installed.contains("systemctl restart tcpgate.service"),
        "{installed}"
    );
    ensure!(container.property(UNIT, "MainPID")? == main, "not reloaded");
    ensure!(container.property(UNIT, "ActiveState")? == "active");
    Ok(())
}

/// `systemctl stop` waited for the agents: no SIGKILL, and no notification
/// systemd refused (a process other than the main one speaking).
pub fn stopped_cleanly(container: &Container) -> Result<()> {
    let journal = container.run(&["journalctl", "--no-pager", "-u", UNIT])?;
    for bad in ["SIGKILL", "reception only permitted"] {
        ensure!(!journal.contains(bad), "{bad:?} in the journal:\n{journal}");
    }
    Ok(())
}
