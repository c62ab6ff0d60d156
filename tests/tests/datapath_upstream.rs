//! Upstream failures on both data paths: the upstream refuses the
//! agent's connect, or resets mid-stream; the client's connection ends
//! promptly either way, and the audit line says why (split from
//! datapath.rs, which has the byte-exact transfers).

use std::io::Read;
use std::time::Duration;

use anyhow::{Result, ensure};
use tcpgate_tests::{DataPath, ForwardFixture};
use tcpgate_tests::{Payload, serve_once, write_payload};

const MIB: u64 = 1024 * 1024;

tcpgate_tests::on_every_path!(upstream_refuses, upstream_resets_mid_stream);

/// No server: the agent's upstream connect is refused, and the client gets
/// a reset instead of hanging.
fn upstream_refuses(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    // A plain blocking connect: the agent accepts, then resets the client
    // when the upstream refuses, possibly before a polling connect returns.
    let addr = std::net::SocketAddr::from((
        tcpgate_tests::topology::BASTION_RUNNER_V4,
        tcpgate_tests::LISTEN_PORT,
    ));
    let mut client = fx
        .topo
        .runner
        .run(move || std::net::TcpStream::connect(addr))?;
    client.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => anyhow::bail!("client should see the connection end, got {other:?}"),
    }
    let closed = &fx.wait_closed(1)?[0];
    ensure!(closed["reason"] == "upstream_unreachable", "{closed}");
    let logs = fx.agent.logs();
    ensure!(
        logs.contains("upstream unreachable"),
        "the agent logs why:\n{logs}"
    );
    fx.assert_maps_empty()
}

/// The upstream resets mid-stream: the client's stream ends promptly with
/// an error and the session is gone.
fn upstream_resets_mid_stream(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    let server = serve_once(
        &fx.topo.target,
        fx.upstream_addr(),
        |mut stream, _| -> Result<()> {
            let mut first = vec![0u8; MIB as usize];
            stream.read_exact(&mut first)?;
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt reads one linger struct we own.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&stream),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    std::ptr::from_ref(&linger).cast(),
                    size_of::<libc::linger>() as u32,
                )
            };
            ensure!(rc == 0, "SO_LINGER");
            drop(stream);
            Ok(())
        },
    )?;
    let mut client = fx.dial()?;
    let writer = {
        let mut client = client.try_clone()?;
        std::thread::spawn(move || write_payload(&mut client, &Payload::new(800, 256 * MIB)))
    };
    server.join()??;
    client.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => anyhow::bail!("client should see the reset, got {other:?}"),
    }
    let write_result = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    ensure!(
        write_result.is_err(),
        "the client's 256 MiB upload cannot have completed"
    );
    let closed = &fx.wait_closed(1)?[0];
    ensure!(closed["reason"] == "upstream_closed", "{closed}");
    fx.assert_maps_empty()
}
