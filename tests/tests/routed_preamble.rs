//! A token preamble on a routed flow (grant + preamble, routed grants on):
//! the agent never reads a routed flow, so the tc program checks the
//! runner's first bytes and refuses a flow that starts with the preamble
//! magic. The token never reaches the target, whether the preamble comes
//! in one segment, split, or in a fast-open SYN; a stream that only starts
//! like the magic is forwarded byte-exact.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use tcpgate_tests::auth_fixture::{AuthFixture, echo_service};
use tcpgate_tests::metrics::{parse, scrape_unix};
use tcpgate_tests::preamble::{encode, read_answer};
use tcpgate_tests::routed::{DialOptions, fast_open_v4, read_until_end, routed_fixture};
use tcpgate_tests::{OneShot, eventually, pinned_entries, require_root, serve_once, wait_events};

const PORT: u16 = 9000;
const SCREENED: Duration = Duration::from_secs(10);

/// A target that keeps what it reads, and says whether it was reset.
fn recording_target(fx: &AuthFixture) -> Result<OneShot<(Vec<u8>, bool)>> {
    Ok(serve_once(
        &fx.topo.target,
        AuthFixture::target(PORT),
        |mut s, _| read_until_end(&mut s),
    )?)
}

/// A granted runner's connection, segments sent as written.
fn granted_dial(fx: &AuthFixture) -> Result<TcpStream> {
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let stream = fx.dial_from_runner(AuthFixture::target(PORT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Waits until the one flow's program has checked `matched` first bytes.
fn wait_screened(fx: &AuthFixture, matched: u64) -> Result<()> {
    eventually(
        SCREENED,
        &format!("screen_up = {matched}"),
        || -> Result<bool> {
            let entries = pinned_entries(fx.agent.pin_dir(), "flows")?;
            Ok(entries
                .first()
                .is_some_and(|e| e["formatted"]["value"]["screen_up"] == matched))
        },
    )
}

/// The refused flow's close line and metric.
fn refused(fx: &AuthFixture) -> Result<Value> {
    let closed = wait_events(&fx.agent, "session_close", 1)?[0].clone();
    ensure!(
        closed["datapath"] == "routed"
            && closed["reason"] == "auth_failed"
            && closed["detail"]
                .as_str()
                .is_some_and(|d| d.contains("token preamble")),
        "{closed}"
    );
    let m = parse(&scrape_unix(&fx.admin_socket())?)?;
    let count = m.count("tcpgate_routed_preambles_refused_total", &[]);
    ensure!(count == 1.0, "routed_preambles_refused_total = {count}");
    Ok(closed)
}

#[test]
fn a_preamble_in_one_segment_is_reset_before_the_target() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let target = recording_target(&fx)?;
    let mut stream = granted_dial(&fx)?;
    let token = fx.token();
    stream.write_all(&encode(&token))?;
    let (answer, reset) = read_until_end(&mut stream);
    ensure!(
        reset && answer.is_empty(),
        "the runner is reset: {answer:?}"
    );
    let (got, target_reset) = target.join()?;
    ensure!(target_reset, "the target is reset");
    ensure!(
        got.is_empty(),
        "the target got {:?}",
        String::from_utf8_lossy(&got)
    );
    let closed = refused(&fx)?;
    ensure!(closed["kernel_bytes_up"] == 0, "{closed}");
    Ok(())
}

#[test]
fn a_preamble_split_after_two_bytes_is_reset_before_the_token() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let target = recording_target(&fx)?;
    let mut stream = granted_dial(&fx)?;
    let preamble = encode(&fx.token());
    stream.write_all(&preamble[..2])?;
    // The first two bytes passed (they could be any protocol's) and were
    // checked; the rest completes the magic.
    wait_screened(&fx, 2)?;
    stream.write_all(&preamble[2..])?;
    let (_, reset) = read_until_end(&mut stream);
    ensure!(reset, "the runner is reset");
    let (got, target_reset) = target.join()?;
    ensure!(target_reset, "the target is reset");
    ensure!(
        got == b"TC",
        "the target got {:?}",
        String::from_utf8_lossy(&got)
    );
    let closed = refused(&fx)?;
    ensure!(closed["kernel_bytes_up"] == 2, "{closed}");
    Ok(())
}

/// "T", then a stream that is not the magic: forwarded as it is.
#[test]
fn a_stream_that_only_starts_like_the_magic_is_forwarded_byte_exact() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let target = serve_once(&fx.topo.target, AuthFixture::target(PORT), |mut s, _| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).map(|_| got)
    })?;
    let mut stream = granted_dial(&fx)?;
    let mut sent = b"TX".to_vec();
    sent.extend((0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    stream.write_all(&sent[..1])?;
    wait_screened(&fx, 1)?;
    stream.write_all(&sent[1..])?;
    stream.shutdown(Shutdown::Write)?;
    let got = target.join()??;
    ensure!(
        got == sent,
        "the target got {} of {} bytes, or others",
        got.len(),
        sent.len()
    );
    drop(stream);
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["datapath"] == "routed" && closed["kernel_bytes_up"] == sent.len(),
        "{closed}"
    );
    Ok(())
}

/// `tcpgate connect` with a token, from a runner whose source grant is
/// routed: refused before the target, and the error says what to do.
#[test]
fn tcpgate_connect_with_a_token_on_a_routed_grant_says_to_drop_the_token() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let target = recording_target(&fx)?;
    let token = fx.token();
    fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])?;
    let token_file = fx.token_file(&token)?;
    let output = fx
        .topo
        .runner
        .command(fx.agent.binary())
        .arg("connect")
        .arg("--token-file")
        .arg(&token_file)
        .arg("192.0.2.10:9000")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(1) && stderr.contains("connect without a token"),
        "{:?}: {stderr}",
        output.status
    );
    let (got, _) = target.join()?;
    ensure!(
        got.is_empty(),
        "the target got {:?}",
        String::from_utf8_lossy(&got)
    );
    refused(&fx)?;
    Ok(())
}

/// A preamble in the SYN itself (TCP Fast Open without a cookie): the
/// program cannot check bytes that come before the flow exists, so such a
/// SYN is not routed. The intercepting path reads the preamble, and the
/// echoing target never sees it.
#[test]
fn a_preamble_in_a_fast_open_syn_takes_the_intercepting_path() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let server = echo_service(&fx, b"")?;
    let token = fx.token();
    fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])?;
    // Client fast open, data in the SYN without a cookie.
    fx.topo.runner.sysctl("net.ipv4.tcp_fastopen", "5")?;
    let preamble = encode(&token);
    let target = AuthFixture::target(PORT);
    let (mut stream, syn_data) = fx
        .topo
        .runner
        .run(|| fast_open_v4(target, &preamble, DialOptions::default()))?;
    ensure!(syn_data > 0, "the SYN carried the preamble's first bytes");
    let (status, message) = read_answer(&mut stream)?;
    ensure!(status == 0, "the agent admits the preamble: {message}");
    stream.write_all(b"ping")?;
    let mut back = [0u8; 4];
    stream.read_exact(&mut back)?;
    ensure!(
        &back == b"ping",
        "the echo holds no preamble byte: {back:?}"
    );
    drop(stream);
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["datapath"] != "routed" && closed["bytes_up"] == 4,
        "intercepted, the preamble read by the agent: {closed}"
    );
    let m = parse(&scrape_unix(&fx.admin_socket())?)?;
    let opened = m.count("tcpgate_routed_flows_opened_total", &[]);
    ensure!(opened == 0.0, "routed_flows_opened_total = {opened}");
    server.stop()?;
    Ok(())
}
