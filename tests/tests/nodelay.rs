//! The agent's two sockets of a session send what they are given at once
//! (`TCP_NODELAY`), on every data path: a relay with Nagle's algorithm on
//! holds a short write until its peer acknowledges the previous one, and a
//! delayed ACK then stalls request/response traffic for up to 40 ms that
//! end to end would flow freely (`cargo xtask bench --only takeover` saw
//! 43–48 ms pauses in every run before this).

use std::io::{Read, Write};

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::{AuthFixture, authenticate, echo_service};
use tcpgate_tests::held_sockets::held_connections;
use tcpgate_tests::{DataPath, ForwardFixture, serve_once};

tcpgate_tests::on_every_path!(both_session_sockets_send_at_once);

fn both_session_sockets_send_at_once(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    let server = serve_once(&fx.topo.target, fx.upstream_addr(), |mut stream, _| {
        stream.write_all(b"!")?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        std::io::Result::Ok(rest.len())
    })?;
    let mut client = fx.dial()?;
    let mut greeting = [0u8; 1];
    client.read_exact(&mut greeting)?;
    let runner_side = client.local_addr()?;
    let held = held_connections(fx.agent.pid()).context("the agent's sockets")?;
    let with = |peer| held.iter().find(|c| c.peer == peer);
    let to_runner = with(runner_side).with_context(|| format!("client socket: {held:?}"))?;
    let to_target =
        with(fx.upstream_addr()).with_context(|| format!("upstream socket: {held:?}"))?;
    ensure!(
        to_runner.nodelay && to_target.nodelay,
        "Nagle left on: {to_runner:?} {to_target:?}"
    );
    client.write_all(b"done")?;
    client.shutdown(std::net::Shutdown::Write)?;
    ensure!(server.join()?? == 4, "the session carried the bytes");
    Ok(())
}

/// Intercepted sessions (the transparent listener, not a `[[forward]]`),
/// admitted by a token preamble and by a source grant: the agent's two
/// sockets send at once either way.
#[test]
fn intercepted_sessions_by_preamble_and_by_grant_send_at_once() -> Result<()> {
    if !tcpgate_tests::require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let _server = echo_service(&fx, b"")?;
    let target = AuthFixture::target(9000);
    let check = |client: &mut std::net::TcpStream, how: &str| -> Result<()> {
        client.write_all(b"ping")?;
        let mut back = [0u8; 4];
        client.read_exact(&mut back)?;
        ensure!(&back == b"ping", "{how}: echo");
        let held = held_connections(fx.agent.pid()).context("the agent's sockets")?;
        let runner_side = client.local_addr()?;
        let to_runner = held.iter().find(|c| c.peer == runner_side);
        let to_target = held.iter().find(|c| c.peer == target);
        ensure!(
            to_runner.is_some_and(|c| c.nodelay) && to_target.is_some_and(|c| c.nodelay),
            "{how}: both session sockets with TCP_NODELAY: {held:?}"
        );
        Ok(())
    };
    let mut by_preamble = fx.dial_from_runner(target)?;
    let (status, message) = authenticate(&mut by_preamble, &fx.token())?;
    ensure!(status == 0, "preamble refused: {message}");
    check(&mut by_preamble, "preamble")?;
    drop(by_preamble);
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let mut by_grant = fx.dial_from_runner(target)?;
    check(&mut by_grant, "grant")?;
    Ok(())
}
