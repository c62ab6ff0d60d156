//! Revocation after a takeover, from the attacker's side: a CI job whose
//! session drains in the old agent must lose it when its grant is revoked
//! after the upgrade (through the successor's API, or through the pinned
//! maps when no API answers), and its token stays refused; a successor
//! killed with SIGKILL leaves the old agent still ending the session at
//! its grant's expiry.

use std::io::Read;
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tcpgate_tests::auth_fixture::{AuthFixture, authenticate, streamer};
use tcpgate_tests::takeover::{AuthTakeover, GrantedTakeover, exits_by_itself, stops_cleanly};
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::{AcceptLoop, Agent, Signal, eventually, require_root, wait_events_within};

/// How long a drained session may take to end once its grant is revoked
/// (the streamer below would run on for 90 s).
const ENDS_WITHIN: Duration = Duration::from_secs(20);

/// Reads the stream in a thread until it ends: (bytes, when it ended).
fn read_until_end(mut stream: TcpStream) -> JoinHandle<(u64, SystemTime)> {
    std::thread::spawn(move || tcpgate_tests::payload::read_until_end(&mut stream))
}

/// Waits (bounded) for the reader to see the stream end.
fn ended(reader: JoinHandle<(u64, SystemTime)>, bound: Duration) -> Result<(u64, SystemTime)> {
    eventually(bound, "the drained session ends", || reader.is_finished())?;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))
}

/// The old agent's one `session_close`, marked drained.
fn drained_close(old: &Agent, bound: Duration) -> Result<Value> {
    let closes = wait_events_within(old, "session_close", 1, bound)?;
    ensure!(closes.len() == 1, "{closes:?}");
    ensure!(closes[0]["handover"] == "drained", "{}", closes[0]);
    Ok(closes[0].clone())
}

struct Drained {
    fx: AuthFixture,
    _dir: tempfile::TempDir,
    _server: AcceptLoop<u64>,
    token: String,
    grant: String,
    reader: JoinHandle<(u64, SystemTime)>,
    next: Agent,
}

/// A runner's session through the agent (grant expiring at `exp`), then a
/// successor that took over: the session drains in the old agent.
fn drained_session(exp: u64) -> Result<Drained> {
    let t = GrantedTakeover::start(&[], exp, "job-drained")?;
    Ok(Drained {
        reader: read_until_end(t.stream),
        fx: t.fx,
        _dir: t.dir,
        _server: t.server,
        token: t.token,
        grant: t.grant,
        next: t.next,
    })
}

#[test]
fn a_revocation_after_the_takeover_ends_the_drained_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut d = drained_session(unix_now() + 600)?;
    // The operator revokes through the successor's API (the operator
    // socket is the successor's now).
    let admin = d.fx.admin_socket().display().to_string();
    let (status, stdout, stderr) =
        d.fx.cli(&d.fx.topo.bastion, &["revoke", "--admin", &admin, &d.grant])?;
    ensure!(status == 0, "revoke: {status} {stdout} {stderr}");
    let (bytes, _) = ended(d.reader, ENDS_WITHIN).with_context(|| d.fx.agent.logs_tail(20))?;
    ensure!(bytes > 64 * 1024, "the drained session streamed before");
    let close = drained_close(&d.fx.agent, ENDS_WITHIN)?;
    ensure!(close["reason"] == "revoked", "{close}");
    d.fx.agent
        .wait_for_log("grant revoked by the successor", ENDS_WITHIN)?;
    // The same token gets nothing from the successor.
    let refused = d.fx.grant_from_runner(&d.token, &[]);
    ensure!(refused.is_err(), "a revoked token got a grant: {refused:?}");
    // Nothing left to drain: the old agent exits.
    exits_by_itself(&mut d.fx.agent, "the old agent exits once drained")?;
    stops_cleanly(&mut d.next)?;
    Ok(())
}

#[test]
fn without_an_api_a_revocation_reaches_the_drained_session_through_its_pins() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut d = drained_session(unix_now() + 600)?;
    // No agent answers the API: the successor is gone.
    d.next.signal(Signal::SIGKILL)?;
    d.next
        .wait_exit(Duration::from_secs(60))?
        .context("SIGKILL")?;
    let admin = d.fx.admin_socket().display().to_string();
    let pins = d.fx.agent.pin_dir().display().to_string();
    // The CLI needs the host's /sys/fs/bpf (ip netns exec remounts /sys).
    let output =
        d.fx.topo
            .bastion
            .command_keep_mounts(d.fx.agent.binary())?
            .args(["revoke", "--admin", &admin, "--pin-dir", &pins, &d.grant])
            .output()?;
    let (status, stdout, stderr) = (
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    ensure!(
        stdout.contains("draining-"),
        "revoke: {status:?} {stdout} {stderr}"
    );
    ended(d.reader, ENDS_WITHIN).with_context(|| format!("{stdout}\n{stderr}"))?;
    let close = drained_close(&d.fx.agent, ENDS_WITHIN)?;
    ensure!(close["reason"] == "revoked", "{close}");
    exits_by_itself(&mut d.fx.agent, "the old agent exits once drained")?;
    Ok(())
}

#[test]
fn a_killed_successor_leaves_the_drained_session_ending_at_expiry() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Long enough for the takeover to be over before it.
    let exp = unix_now() + 20;
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
    let mut d = drained_session(exp)?;
    d.next.signal(Signal::SIGKILL)?;
    d.next
        .wait_exit(Duration::from_secs(60))?
        .context("SIGKILL")?;
    let (_, end) = ended(d.reader, Duration::from_secs(60))?;
    ensure!(end >= expiry, "the session ended before its grant");
    let close = drained_close(&d.fx.agent, ENDS_WITHIN)?;
    ensure!(close["reason"] == "grant_expired", "{close}");
    ensure!(
        d.fx.agent
            .logs()
            .contains("the successor closed the takeover connection"),
        "{}",
        d.fx.agent.logs_tail(20)
    );
    Ok(())
}

/// A session admitted by a preamble: its grant is not handed over (the
/// successor does not know it), yet `revoke --subject` on the successor
/// ends it where it drains.
#[test]
fn a_subject_revoked_after_the_takeover_ends_a_drained_preamble_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const SUBJECT: &str = "project_path:group/drained:ref_type:branch:ref:main";
    let mut t = AuthTakeover::start()?;
    let fx = &t.fx;
    let _server = streamer(fx, Duration::from_secs(90))?;
    let token = fx.keys.rsa.sign(&claims_with(&[
        ("exp", json!(unix_now() + 600)),
        ("sub", json!(SUBJECT)),
    ]));
    let mut stream = fx.dial_from_runner(AuthFixture::target(5432))?;
    let (status, message) = authenticate(&mut stream, &token)?;
    ensure!(status == 0, "preamble: {status} {message}");
    let mut buf = vec![0u8; 64 * 1024];
    stream.read_exact(&mut buf)?;
    let mut next = t.take_over()?;
    let fx = &mut t.fx;
    let reader = read_until_end(stream);
    let admin = fx.admin_socket().display().to_string();
    let (status, stdout, stderr) = fx.cli(
        &fx.topo.bastion,
        &["revoke", "--admin", &admin, "--subject", SUBJECT],
    )?;
    ensure!(status == 0, "revoke: {status} {stdout} {stderr}");
    ended(reader, ENDS_WITHIN).with_context(|| fx.agent.logs_tail(20))?;
    let close = drained_close(&fx.agent, ENDS_WITHIN)?;
    ensure!(close["reason"] == "revoked", "{close}");
    // The agent's stderr is read by a thread; the line may trail the close.
    fx.agent
        .wait_for_log("subject revoked by the successor", ENDS_WITHIN)?;
    // The subject is refused by the successor too.
    let mut again = fx.dial_from_runner(AuthFixture::target(5432))?;
    let (status, message) = authenticate(&mut again, &token)?;
    ensure!(status != 0, "a revoked subject was admitted: {message}");
    exits_by_itself(&mut fx.agent, "the old agent exits once drained")?;
    stops_cleanly(&mut next)?;
    Ok(())
}
