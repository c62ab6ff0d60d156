//! The agent's two sockets of a session send what they are given at once
//! (`TCP_NODELAY`), on every data path: a relay with Nagle's algorithm on
//! holds a short write until its peer acknowledges the previous one, and a
//! delayed ACK then stalls request/response traffic for up to 40 ms that
//! end to end would flow freely (`cargo xtask bench --only takeover` saw
//! 43–48 ms pauses in every run before this).

use std::io::{Read, Write};

use anyhow::{Context, Result, ensure};
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
