//! ssh, rsync and git over ssh, each connection through `tcpgate connect`
//! as the `ProxyCommand`. rsync and git lean on ssh's own channel EOF, not
//! on TCP half-close, so these check that nothing in the relay cuts a
//! transfer short or keeps a finished one open.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tcpgate_tests::{ChildGuard, Digest, Payload, require_root};

use super::ssh::SshSetup;
use tcpgate_tests::auth_fixture::{AuthFixture, policy};
use tcpgate_tests::wait_events;

/// Runs `command` and fails with its stderr unless it succeeds.
fn run_ok(command: &mut Command, what: &str) -> Result<Output> {
    let output = command.output().with_context(|| format!("run {what}"))?;
    ensure!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// Every session to the target's sshd ended normally, and together they
/// carried at least `up` bytes up and `down` down through the agent.
fn assert_ssh_sessions(fx: &AuthFixture, sessions: usize, up: u64, down: u64) -> Result<()> {
    let closed = wait_events(&fx.agent, "session_close", sessions)?;
    let sum = |field: &str| {
        closed
            .iter()
            .filter_map(|e: &Value| e[field].as_u64())
            .sum::<u64>()
    };
    for event in &closed {
        ensure!(
            event["destination"] == "192.0.2.10:22" && event["reason"] != "grant_expired",
            "{event}"
        );
    }
    let (sent, received) = (
        sum("kernel_bytes_up") + sum("userspace_bytes_up"),
        sum("kernel_bytes_down") + sum("userspace_bytes_down"),
    );
    ensure!(
        sent >= up && received >= down,
        "through the agent: {sent} B up, {received} B down; expected at least {up} and {down}"
    );
    Ok(())
}

#[test]
fn ssh_returns_when_the_grant_expires() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start_with(&policy("5s"), &[])?;
    let dir = tempfile::tempdir()?;
    let ssh = SshSetup::start(&fx, dir.path())?;
    // stdin stays open, as in an interactive session: only the end of the
    // connection can make ssh return before the remote command does.
    let mut command = ssh.ssh(&fx.topo.runner, &["sleep", "600"]);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut client = ChildGuard::new(command.spawn()?, "ssh");
    let closed = fx
        .agent
        .wait_for_audit(|e| e["event"] == "session_close", Duration::from_secs(60))?;
    ensure!(closed["reason"] == "grant_expired", "{closed}");
    let Some(status) = client.wait_timeout(Duration::from_secs(20))? else {
        bail!("ssh still runs 20 s after the agent ended its session");
    };
    ensure!(!status.success(), "ssh after its grant expired: {status}");
    Ok(())
}

/// Writes `payload` to `path`.
fn write_payload(path: &Path, payload: &Payload) -> Result<()> {
    Ok(std::fs::write(path, payload.to_vec())?)
}

#[test]
fn rsync_over_ssh_is_byte_exact() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let dir = tempfile::tempdir()?;
    let ssh = SshSetup::start(&fx, dir.path())?;
    let local = dir.path().join("local");
    let remote = dir.path().join("remote");
    let back = dir.path().join("back");
    for d in [&local, &remote, &back] {
        std::fs::create_dir(d)?;
    }
    let big = Payload::new(12, 6 << 20);
    write_payload(&local.join("big.bin"), &big)?;
    write_payload(&local.join("small.bin"), &Payload::new(13, 1000))?;
    std::fs::write(local.join("empty"), b"")?;
    let rsync = |from: String, to: String| {
        let mut command = fx.topo.runner.command("rsync");
        command
            .args(["-a", "--whole-file", "-e", &ssh.ssh_command()])
            .args([from, to]);
        run_ok(&mut command, "rsync")
    };
    // Push to the target, then pull it back: one ssh connection each.
    rsync(
        format!("{}/", local.display()),
        format!("target:{}/", remote.display()),
    )?;
    rsync(
        format!("target:{}/", remote.display()),
        format!("{}/", back.display()),
    )?;
    for name in ["big.bin", "small.bin", "empty"] {
        let original = Digest::of(&std::fs::read(local.join(name))?);
        for copy in [&remote, &back] {
            let copied = Digest::of(&std::fs::read(copy.join(name))?);
            ensure!(copied == original, "{name} differs in {}", copy.display());
        }
    }
    assert_ssh_sessions(&fx, 2, big.len, big.len)
}

#[test]
fn git_over_ssh_clones_and_pushes() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let dir = tempfile::tempdir()?;
    let ssh = SshSetup::start(&fx, dir.path())?;
    let bare = dir.path().join("repo.git");
    let git = |cwd: &Path, args: &[&str]| {
        let mut command = fx.topo.runner.command("git");
        command
            .current_dir(cwd)
            .args([
                "-c",
                "user.name=tcpgate test",
                "-c",
                "user.email=test@example.com",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .env("GIT_SSH_COMMAND", ssh.ssh_command());
        run_ok(&mut command, &format!("git {}", args.join(" ")))
    };
    git(dir.path(), &["init", "--bare", "-q", "repo.git"])?;
    let url = format!("target:{}", bare.display());
    git(dir.path(), &["clone", "-q", &url, "work"])?;
    let work = dir.path().join("work");
    let payload = Payload::new(14, 2 << 20);
    write_payload(&work.join("data.bin"), &payload)?;
    git(&work, &["add", "data.bin"])?;
    git(&work, &["commit", "-q", "-m", "data"])?;
    git(&work, &["push", "-q", "origin", "HEAD:main"])?;
    git(dir.path(), &["clone", "-q", &url, "again"])?;
    let head = |repo: &Path| -> Result<String> {
        let out = git(repo, &["rev-parse", "HEAD"])?;
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    };
    let pushed = head(&work)?;
    ensure!(head(&bare)? == pushed, "the bare repository has the push");
    ensure!(
        head(&dir.path().join("again"))? == pushed,
        "the second clone"
    );
    let cloned = std::fs::read(dir.path().join("again/data.bin"))?;
    ensure!(Digest::of(&cloned) == payload.digest(), "data.bin differs");
    // clone, push, clone; git compresses, so only a floor on the bytes.
    assert_ssh_sessions(&fx, 3, 1 << 20, 1 << 20)
}
