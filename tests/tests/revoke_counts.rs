//! `tcpgate revoke` reports what it ended, after it ended: exact session
//! counts with 50 live sessions, by grant id and by subject (issue 12.3:
//! the count used to race the teardown and often said 0).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, authenticate, echo_service};
use tcpgate_tests::require_root;
use tcpgate_tests::tokens::claims_with;
use tcpgate_tests::wait_events;

const SESSIONS: usize = 50;
const ROUNDS: usize = 2;

/// A token of its own subject (and `jti`), so that one round's revocation
/// says nothing about the next round's token.
fn token(fx: &AuthFixture, round: usize) -> (String, String) {
    let subject = format!("project_path:group/app:ref_type:branch:ref:release/1.{round}");
    let claims = claims_with(&[
        ("sub", json!(subject)),
        ("jti", json!(format!("revoke-counts-{round}"))),
    ]);
    (fx.keys.rsa.sign(&claims), subject)
}

/// How a round's sessions are admitted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// By the runner's source grant: plain connections.
    SourceGrant,
    /// Each by its own token preamble (one grant per session).
    Preamble,
}

/// Opens [`SESSIONS`] sessions to the echo service and proves each one is
/// spliced (an echoed byte).
fn open_sessions(fx: &AuthFixture, admission: Admission, token: &str) -> Result<Vec<TcpStream>> {
    (0..SESSIONS)
        .map(|_| {
            let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
            if admission == Admission::Preamble {
                let (status, message) = authenticate(&mut stream, token)?;
                ensure!(status == 0, "preamble refused: {message}");
            }
            stream.write_all(b"x")?;
            let mut back = [0u8; 1];
            stream.read_exact(&mut back)?;
            ensure!(&back == b"x", "echo");
            Ok(stream)
        })
        .collect()
}

/// `tcpgate revoke <what>` must report `expected` (sessions per grant
/// line), and the sessions must be over, each audited as revoked.
fn revoke_round(
    fx: &AuthFixture,
    round: usize,
    mut streams: Vec<TcpStream>,
    what: &[&str],
    expected: &[usize],
) -> Result<()> {
    let counts = revoke(fx, what)?;
    ensure!(counts == expected, "round {round}: {counts:?}");
    assert_all_ended(&mut streams)?;
    assert_audited(fx, round)
}

/// Every stream is ended by the agent (EOF or reset), none times out.
fn assert_all_ended(streams: &mut [TcpStream]) -> Result<()> {
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut rest = Vec::new();
        match stream.read_to_end(&mut rest) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("session {i} still open after the revocation")
            }
            _ => ensure!(rest.is_empty(), "session {i} got {rest:?}"),
        }
    }
    Ok(())
}

/// `tcpgate revoke` on the bastion; returns the session count of each
/// `revoked grant …, N session(s) ended` line.
fn revoke(fx: &AuthFixture, what: &[&str]) -> Result<Vec<usize>> {
    let admin = fx.admin_socket().display().to_string();
    let mut args = vec!["revoke", "--admin", &admin];
    args.extend_from_slice(what);
    let (status, stdout, stderr) = fx.cli(&fx.topo.bastion, &args)?;
    ensure!(status == 0, "revoke: {status} {stdout} {stderr}");
    stdout
        .lines()
        .map(|line| {
            line.strip_suffix(" session(s) ended")
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("unexpected revoke output: {stdout}"))
        })
        .collect()
}

/// All `round`'s sessions closed with reason `revoked` in the audit log.
fn assert_audited(fx: &AuthFixture, rounds_done: usize) -> Result<()> {
    let closed = wait_events(&fx.agent, "session_close", rounds_done * SESSIONS)?;
    ensure!(
        closed.len() == rounds_done * SESSIONS,
        "{} closes",
        closed.len()
    );
    ensure!(
        closed.iter().all(|e| e["reason"] == "revoked"),
        "reasons: {closed:?}"
    );
    Ok(())
}

#[test]
fn revoke_by_grant_id_counts_every_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let _echo = echo_service(&fx, b"")?;
    for round in 1..=ROUNDS {
        let (token, _) = token(&fx, round);
        let grant = fx.grant_from_runner(&token, &[])?;
        let streams = open_sessions(&fx, Admission::SourceGrant, &token)?;
        revoke_round(&fx, round, streams, &[&grant], &[SESSIONS])?;
    }
    Ok(())
}

#[test]
fn revoke_by_subject_counts_every_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let _echo = echo_service(&fx, b"")?;
    // Round 1: one source grant with every session. Round 2: preamble
    // sessions, one grant each (no source grant is left to admit them).
    for round in 1..=ROUNDS {
        let (token, subject) = token(&fx, round);
        let (admission, expected) = if round == 1 {
            fx.grant_from_runner(&token, &[])?;
            (Admission::SourceGrant, vec![SESSIONS])
        } else {
            (Admission::Preamble, vec![1; SESSIONS])
        };
        let streams = open_sessions(&fx, admission, &token)?;
        revoke_round(&fx, round, streams, &["--subject", &subject], &expected)?;
    }
    Ok(())
}
