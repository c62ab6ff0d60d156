//! 1,000 idle sessions survive a takeover: they stay with the old agent,
//! which drains them, and each still answers byte-exact afterwards.

use std::io::Read;
use std::net::Shutdown;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::takeover::{agent_lines, echo_once, successor, wait_taken_over};
use tcpgate_tests::{
    DataPath, ForwardFixture, Payload, accept_loop, read_to_end_hashed, write_payload,
};

const SESSIONS: usize = 1000;
const SIZE: u64 = 4 * 1024;

tcpgate_tests::on_both_paths!(a_thousand_idle_sessions_survive_a_takeover);

fn a_thousand_idle_sessions_survive_a_takeover(path: DataPath) -> Result<()> {
    tcpgate_tests::raise_nofile();
    let dir = tempfile::tempdir()?;
    let mut fx = ForwardFixture::start_tuned(path, &agent_lines(dir.path()), "")?;
    let echo = accept_loop(
        &fx.topo.target,
        fx.upstream_addr(),
        SESSIONS,
        |mut stream, _| -> Result<()> {
            let mut data = Vec::new();
            stream.read_to_end(&mut data)?;
            std::io::Write::write_all(&mut stream, &data)?;
            stream.shutdown(Shutdown::Write)?;
            Ok(())
        },
    )?;
    let mut clients = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let mut client = fx.dial().with_context(|| format!("dial #{i}"))?;
        write_payload(&mut client, &Payload::new(i as u64, SIZE))?;
        clients.push(client);
    }
    tcpgate_tests::wait_events(&fx.agent, "session_open", SESSIONS)?;
    let mut next = successor(
        &fx.topo.bastion,
        fx.agent.config_path(),
        &["--datapath", path.flag()],
        &[],
    )?;
    wait_taken_over(&fx.agent)?;
    ensure!(
        fx.wait_closed(0)?.is_empty(),
        "no session ended at the takeover"
    );
    for client in &clients {
        client.shutdown(Shutdown::Write)?;
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let (len, digest) = read_to_end_hashed(client)?;
        ensure!(
            len == SIZE && digest == Payload::new(i as u64, SIZE).digest(),
            "session {i} did not answer byte-exact after the takeover"
        );
    }
    echo.stop()?.into_iter().collect::<Result<Vec<()>>>()?;
    let closes = fx.wait_closed(SESSIONS)?;
    for event in &closes {
        ensure!(event["handover"] == "drained", "{event}");
        fx.assert_bytes(event, SIZE, SIZE)?;
    }
    let status = fx
        .agent
        .wait_exit(std::time::Duration::from_secs(60))?
        .context("the old agent exits once drained")?;
    ensure!(status.success(), "{status:?}\n{}", fx.agent.logs_tail(20));
    echo_once(&fx, b"next").with_context(|| next.logs_tail(20))?;
    let status = next.stop()?;
    ensure!(status.success(), "{status:?}\n{}", next.logs_tail(20));
    Ok(())
}
