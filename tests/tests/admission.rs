//! Admission from the attacker's side: a granted runner's token never
//! reaches the target, revocation sticks and has no survivors, and idle
//! unauthenticated connections cannot hold the agent (the bounds are in
//! admission/bounds.rs).

mod admission {
    pub mod bounds;
}

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, authenticate};
use tcpgate_tests::tokens::claims_with;
use tcpgate_tests::wait_events;
use tcpgate_tests::{accept_loop, require_root};

const CONNECT_RUNS: usize = 200;

/// A target service that echoes and logs every byte it receives on each
/// connection; it speaks first (like ssh) when `greeting` is not empty.
fn logging_server(
    fx: &AuthFixture,
    conns: usize,
    greeting: &'static [u8],
) -> Result<tcpgate_tests::AcceptLoop<Vec<u8>>> {
    Ok(accept_loop(
        &fx.topo.target,
        AuthFixture::target(9000),
        conns,
        move |mut stream, _| {
            if !greeting.is_empty() {
                let _ = stream.write_all(greeting);
            }
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            seen
        },
    )?)
}

/// Issue 11, item 9: a runner holding a source grant that also uses
/// `tcpgate connect` (the documented ssh ProxyCommand) must never have
/// its preamble, and so its token, delivered to the target.
#[test]
fn a_granted_runner_using_connect_never_leaks_its_token() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = logging_server(&fx, CONNECT_RUNS, b"HELLO\n")?;
    let token = fx.token();
    fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000", "--lifetime", "10m"])?;
    let token_file = fx.token_file(&token)?;
    let command = format!(
        "printf 'ping' | {} connect --token-file {} 192.0.2.10:9000",
        fx.agent.binary().display(),
        token_file.to_str().context("utf-8")?
    );
    // A run may be refused, never leak: a client descheduled past the
    // first-bytes wait sends its preamble after the target's greeting, which
    // the agent has relayed to it; the agent then refuses the connection
    // (`late_preamble`) instead of splicing the token upstream.
    let mut refused = Vec::new();
    for run in 0..CONNECT_RUNS {
        let output = fx
            .topo
            .runner
            .command("sh")
            .args(["-c", &command])
            .output()?;
        if output.status.success() && output.stdout == b"HELLO\nping" {
            continue;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains("bad magic"),
            "run {run}: status {:?}, stdout {:?}, stderr {stderr}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
        );
        refused.push(run);
    }
    println!(
        "{} of {CONNECT_RUNS} runs refused as late preambles",
        refused.len()
    );
    let received = server.stop()?;
    ensure!(
        received.len() == CONNECT_RUNS,
        "{} connections",
        received.len()
    );
    for (run, bytes) in received.iter().enumerate() {
        // Exactly the client's payload, or nothing for a refused run: not
        // one byte of "TCPG", the header or the token got through.
        ensure!(
            bytes == b"ping" || bytes.is_empty(),
            "run {run}: the target received {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    let empty = received.iter().filter(|b| b.is_empty()).count();
    ensure!(
        empty == refused.len(),
        "{empty} target connections saw nothing, {} runs were refused",
        refused.len()
    );
    let opened = wait_events(&fx.agent, "session_open", CONNECT_RUNS - refused.len())?;
    ensure!(
        opened.len() == CONNECT_RUNS - refused.len(),
        "{} sessions",
        opened.len()
    );
    if !refused.is_empty() {
        let denied = wait_events(&fx.agent, "connection_denied", refused.len())?;
        ensure!(
            denied.iter().all(|e| e["reason"] == "late_preamble"),
            "refusals: {denied:?}"
        );
    }
    Ok(())
}

/// `revoke --subject` sticks: the same still-valid token is refused by
/// the grant API and in a preamble, with reason `revoked`; other subjects
/// are untouched.
#[test]
fn revoked_subject_cannot_ask_again() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = tcpgate_tests::auth_fixture::echo_service(&fx, b"")?;
    let token = fx.token();
    fx.grant_from_runner(&token, &[])?;
    let admin = fx.admin_socket().display().to_string();
    let subject = "project_path:group/app:ref_type:branch:ref:release/1.4";
    let (status, stdout, stderr) = fx.cli(
        &fx.topo.bastion,
        &["revoke", "--admin", &admin, "--subject", subject],
    )?;
    ensure!(status == 0, "revoke: {status} {stdout} {stderr}");

    let file = fx.token_file(&token)?;
    let api = AuthFixture::api_url();
    let ca = fx.api_ca.to_str().context("utf-8")?;
    let (status, _, stderr) = fx.cli(
        &fx.topo.runner,
        &[
            "grant",
            "--token-file",
            file.to_str().context("utf-8")?,
            "--api",
            &api,
            "--ca",
            ca,
        ],
    )?;
    ensure!(
        status != 0 && stderr.contains("revoked"),
        "grant API after revocation: {status} {stderr}"
    );
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &token)?;
    ensure!(
        status == 1 && message == "access denied (revoked)",
        "preamble after revocation: {status} {message:?}"
    );
    let denied = wait_events(&fx.agent, "connection_denied", 1)?;
    ensure!(
        denied[0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("revoked")),
        "{}",
        denied[0]
    );

    let other = fx.keys.rsa.sign(&claims_with(&[(
        "sub",
        json!("project_path:group/app:ref_type:branch:ref:release/2.0"),
    )]));
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &other)?;
    ensure!(status == 0, "another subject: {status} {message}");
    stream.write_all(b"still works")?;
    let mut back = [0u8; 11];
    stream.read_exact(&mut back)?;
    ensure!(&back == b"still works");
    drop(stream);
    server.stop()?;
    Ok(())
}

/// How long a worker of the storm holds a session the agent does not end
/// (longer than the test waits for sessions to end).
const HOLD: Duration = Duration::from_secs(30);

/// The storm's worker threads: stopped and joined on drop, also when the
/// test fails, so they let go of the fixture before it is torn down.
struct Workers {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A revocation storm against concurrent admissions of the same token.
/// Workers admit sessions back to back. Churners leave each session at
/// once, so admissions are always in flight when the storm hits; holders
/// keep every other session until the agent ends it. Afterwards every
/// admission is refused, and before any client lets go, every session ever
/// opened has closed and the pinned maps are empty: no survivor.
#[test]
fn revocation_storm_leaves_no_survivor() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const WORKERS: usize = 12;
    const CHURNERS: usize = 6;
    let fx = Arc::new(AuthFixture::start()?);
    let server = logging_server(&fx, 100_000, b"HELLO\n")?;
    let token = Arc::new(fx.token());
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..WORKERS + CHURNERS)
        .map(|worker| {
            let holder = worker < WORKERS;
            let (fx, token, stop, refused) = (
                Arc::clone(&fx),
                Arc::clone(&token),
                Arc::clone(&stop),
                Arc::clone(&refused),
            );
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let Ok(mut stream) = fx.dial_from_runner(AuthFixture::target(9000)) else {
                        continue;
                    };
                    match authenticate(&mut stream, &token) {
                        Ok((0, _)) if holder && round.is_multiple_of(2) => {
                            let _ = stream.set_read_timeout(Some(HOLD));
                            let mut sink = Vec::new();
                            let _ = stream.read_to_end(&mut sink);
                        }
                        Ok((0, _)) => {}
                        Ok(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {}
                    }
                }
            })
        })
        .collect();
    let workers = Workers {
        stop: Arc::clone(&stop),
        handles,
    };
    wait_events(&fx.agent, "session_open", WORKERS)?;
    let admin = fx.admin_socket().display().to_string();
    let subject = "project_path:group/app:ref_type:branch:ref:release/1.4";
    for _ in 0..5 {
        let (status, stdout, stderr) = fx.cli(
            &fx.topo.bastion,
            &["revoke", "--admin", &admin, "--subject", subject],
        )?;
        ensure!(status == 0, "revoke: {status} {stdout} {stderr}");
    }
    // The workers keep trying after the storm: all refused.
    let before = refused.load(Ordering::Relaxed);
    let more =
        tcpgate_tests::eventually(Duration::from_secs(30), "refusals after the storm", || {
            refused.load(Ordering::Relaxed) >= before + 50
        });
    more?;
    // Held sessions end only if the agent ends them: check before letting go.
    let opened = wait_events(&fx.agent, "session_open", 1)?;
    let closed = tcpgate_tests::wait_events_within(
        &fx.agent,
        "session_close",
        opened.len(),
        HOLD - Duration::from_secs(10),
    )?;
    let revoked = closed.iter().filter(|c| c["reason"] == "revoked").count();
    ensure!(revoked > 0, "no session was revoked");
    for close in &closed {
        ensure!(
            close["reason"] == "revoked" || close["reason"] == "client_closed",
            "{close}"
        );
    }
    drop(workers);
    tcpgate_tests::assert_maps_empty(fx.agent.pin_dir())?;
    eprintln!(
        "storm: {} sessions admitted, {revoked} revoked; {} admissions refused",
        opened.len(),
        refused.load(Ordering::Relaxed)
    );
    drop(server);
    Ok(())
}

/// A client that sends its preamble and its first bytes in one write
/// (one segment): the agent reads the preamble alone, and the kernel path
/// must not hand the rest of that segment, preamble and all, to the
/// target. The target sees exactly the client's bytes, with no grant and
/// with the runner's source grant held (the preamble is then read after
/// the first bytes were judged).
#[test]
fn a_preamble_sent_with_its_data_never_reaches_the_target() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const RUNS: usize = 20;
    let fx = AuthFixture::start()?;
    let server = logging_server(&fx, 2 * RUNS, b"")?;
    let token = fx.token();
    for run in 0..2 * RUNS {
        if run == RUNS {
            fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000", "--lifetime", "10m"])?;
        }
        let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
        let mut first = tcpgate_tests::preamble::encode(&token);
        first.extend_from_slice(b"ping");
        stream.write_all(&first)?;
        let (status, message) = tcpgate_tests::auth_fixture::read_answer(&mut stream)?;
        ensure!(status == 0, "run {run}: {status} {message}");
        let mut back = [0u8; 4];
        stream.read_exact(&mut back)?;
        ensure!(
            &back == b"ping",
            "run {run}: {:?}",
            String::from_utf8_lossy(&back)
        );
    }
    let received = server.stop()?;
    for (run, bytes) in received.iter().enumerate() {
        ensure!(
            bytes == b"ping",
            "run {run}: the target received {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    // Every session counts exactly the client's bytes and was spliced
    // once the agent had copied what came with its preamble.
    let closed = wait_events(&fx.agent, "session_close", 2 * RUNS)?;
    for event in &closed {
        ensure!(
            event["datapath"] == "ebpf" && event["bytes_up"] == 4 && event["bytes_down"] == 4,
            "{event}"
        );
    }
    Ok(())
}
