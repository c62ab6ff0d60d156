//! Adoption on takeover (user-space path): the successor goes on with the
//! old agent's live sessions. An adopted session still ends at its grant's
//! expiry and on revocation, in the successor; a successor killed in the
//! middle of a handover takes only what it acknowledged with it (those
//! clients see their connection end), and the old agent keeps serving the
//! rest until they end.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpgate_tests::auth_fixture::AuthFixture;
use tcpgate_tests::takeover::{
    GrantedTakeover, exits_by_itself, forward_fixture, listed_sessions, log_field, log_line,
    stops_cleanly, successor, wait_taken_over,
};
use tcpgate_tests::tokens::unix_now;
use tcpgate_tests::{
    AcceptLoop, Agent, DataPath, accept_loop, eventually, require_root, wait_events,
    wait_events_within,
};

/// The successor's takeover hook (`agent::takeover::STALL_ENV`).
const STALL_ENV: &str = "TCPGATE_TEST_TAKEOVER_STALL";
/// Sessions per handover batch (`agent::takeover::BATCH`).
const BATCH: usize = 32;
const USERSPACE: [&str; 2] = ["--datapath", "userspace"];
/// How long an adopted session may take to end once its grant is revoked
/// (the streamer below would run on for 90 s).
const ENDS_WITHIN: Duration = Duration::from_secs(20);

/// A runner's streaming session through an authenticating user-space
/// agent (grant expiring at `exp`), adopted by a successor.
struct Adopted {
    fx: AuthFixture,
    _dir: tempfile::TempDir,
    _server: AcceptLoop<u64>,
    grant: String,
    reader: JoinHandle<(u64, SystemTime)>,
    next: Agent,
}

fn adopted_session(exp: u64) -> Result<Adopted> {
    let mut t = GrantedTakeover::start(&USERSPACE, exp, "job-adopted")?;
    // Nothing was left to drain: the old agent exits by itself.
    exits_by_itself(
        &mut t.fx.agent,
        "the old agent exits once its session is handed over",
    )?;
    let mut stream = t.stream;
    Ok(Adopted {
        reader: std::thread::spawn(move || tcpgate_tests::payload::read_until_end(&mut stream)),
        fx: t.fx,
        _dir: t.dir,
        _server: t.server,
        grant: t.grant,
        next: t.next,
    })
}

/// The one `session_close`, written by the successor: adopted, with the
/// id the session opened with.
fn adopted_close(fx: &AuthFixture, bound: Duration) -> Result<Value> {
    let closes = wait_events_within(&fx.agent, "session_close", 1, bound)?;
    ensure!(closes.len() == 1, "{closes:?}");
    ensure!(closes[0]["handover"] == "adopted", "{}", closes[0]);
    let opens = wait_events(&fx.agent, "session_open", 1)?;
    ensure!(
        opens[0]["session_id"] == closes[0]["session_id"],
        "same id: {} then {}",
        opens[0],
        closes[0]
    );
    Ok(closes[0].clone())
}

fn ended(reader: JoinHandle<(u64, SystemTime)>, bound: Duration) -> Result<(u64, SystemTime)> {
    eventually(bound, "the adopted session ends", || reader.is_finished())?;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))
}

#[test]
fn an_adopted_session_ends_at_its_grant_expiry_in_the_successor() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Long enough for the takeover to be over before it.
    let exp = unix_now() + 15;
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
    let mut a = adopted_session(exp)?;
    let (bytes, end) = ended(a.reader, Duration::from_secs(60))?;
    ensure!(bytes > 64 * 1024, "the adopted session kept streaming");
    ensure!(end >= expiry, "the session ended before its grant");
    let close = adopted_close(&a.fx, ENDS_WITHIN)?;
    ensure!(close["reason"] == "grant_expired", "{close}");
    ensure!(
        close["bytes_down"].as_u64() >= Some(bytes),
        "the close line counts every byte, across both agents: {close}"
    );
    stops_cleanly(&mut a.next)?;
    Ok(())
}

#[test]
fn a_revocation_after_the_takeover_ends_the_adopted_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut a = adopted_session(unix_now() + 600)?;
    // The operator revokes through the successor's operator socket.
    let admin = a.fx.admin_socket().display().to_string();
    let (status, stdout, stderr) =
        a.fx.cli(&a.fx.topo.bastion, &["revoke", "--admin", &admin, &a.grant])?;
    ensure!(status == 0, "revoke: {status} {stdout} {stderr}");
    let (bytes, _) = ended(a.reader, ENDS_WITHIN).with_context(|| a.next.logs_tail(20))?;
    ensure!(bytes > 64 * 1024, "the adopted session streamed before");
    let close = adopted_close(&a.fx, ENDS_WITHIN)?;
    ensure!(close["reason"] == "revoked", "{close}");
    stops_cleanly(&mut a.next)?;
    Ok(())
}

/// Sends `i`'s ping and checks the echo.
fn ping(client: &mut TcpStream, i: usize) -> Result<()> {
    let ping = format!("ping {i:04}\n");
    client.write_all(ping.as_bytes())?;
    let mut answer = vec![0u8; ping.len()];
    client.read_exact(&mut answer)?;
    ensure!(answer == ping.as_bytes(), "session {i}: echo");
    Ok(())
}

/// Whether the peer ended the connection (FIN or reset), without waiting.
fn peer_ended(client: &TcpStream) -> Result<bool> {
    client.set_nonblocking(true)?;
    let peeked = client.peek(&mut [0u8; 1]);
    client.set_nonblocking(false)?;
    Ok(match peeked {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    })
}

/// The pid of the successor `old` logged as asking to take over.
fn successor_pid(old: &Agent) -> Result<i32> {
    let line = log_line(old, "a successor asks to take over").context("no successor asked")?;
    Ok(log_field(&line, "successor")
        .context(line.clone())?
        .parse()?)
}

const SESSIONS: usize = 80;

#[test]
fn a_successor_killed_mid_handover_leaves_the_rest_with_the_old_agent() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    tcpgate_tests::raise_nofile();
    let dir = tempfile::tempdir()?;
    let mut fx = forward_fixture(DataPath::Userspace, dir.path())?;
    let echo = accept_loop(&fx.topo.target, fx.upstream_addr(), SESSIONS, |mut s, _| {
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            if s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })?;
    let mut clients = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let mut client = fx.dial().with_context(|| format!("dial #{i}"))?;
        client.set_read_timeout(Some(Duration::from_secs(20)))?;
        ping(&mut client, i)?;
        clients.push(client);
    }
    let config = fx.agent.config_path().to_owned();
    let killed = std::thread::scope(|scope| -> Result<i32> {
        let starting = scope.spawn(|| {
            successor(
                &fx.topo.bastion,
                &config,
                &USERSPACE,
                &[(STALL_ENV, "adopt")],
            )
        });
        // The successor serves the operator socket before it adopts: it
        // lists its first batch, then stalls before acknowledging it.
        eventually(
            Duration::from_secs(30),
            "the successor adopts a batch",
            || listed_sessions(dir.path()).is_ok_and(|rows| rows.len() == BATCH),
        )?;
        let pid = successor_pid(&fx.agent)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let started = starting
            .join()
            .map_err(|_| anyhow::anyhow!("successor thread panicked"))?;
        ensure!(started.is_err(), "the killed successor never got ready");
        Ok(pid)
    })?;
    wait_taken_over(&fx.agent)?;
    ensure!(
        fx.agent
            .logs()
            .contains("the successor did not take every session"),
        "{}",
        fx.agent.logs_tail(20)
    );
    // The killed successor's batch ends (no hang); every other session
    // stays with the old agent and still answers.
    let gone = eventually(Duration::from_secs(20), "the adopted batch ends", || {
        let ended = clients
            .iter()
            .filter(|c| peer_ended(c).unwrap_or(true))
            .count();
        (ended >= BATCH).then_some(ended)
    })?;
    ensure!(
        gone == BATCH,
        "{gone} sessions ended, not the batch of {BATCH}"
    );
    let mut kept = 0;
    for (i, client) in clients.iter_mut().enumerate() {
        if !peer_ended(client)? {
            ping(client, i).with_context(|| fx.agent.logs_tail(20))?;
            kept += 1;
        }
    }
    ensure!(kept == SESSIONS - BATCH, "{kept} sessions kept");
    drop(clients);
    // The old agent drained what it kept and wrote their close lines; the
    // killed successor wrote none.
    let closes = fx.wait_closed(SESSIONS - BATCH)?;
    ensure!(closes.len() == SESSIONS - BATCH, "{} closes", closes.len());
    for event in &closes {
        ensure!(event["handover"] == "drained", "{event}");
    }
    exits_by_itself(&mut fx.agent, "the old agent exits once drained")?;
    // No agent process is left behind, and every upstream connection
    // ended.
    ensure!(
        !Path::new(&format!("/proc/{killed}")).exists(),
        "the killed successor is still there"
    );
    echo.stop()?;
    Ok(())
}
