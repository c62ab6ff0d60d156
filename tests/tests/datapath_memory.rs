//! The splice data path under load, on both implementations: a thousand
//! concurrent sessions, and a slow reader. Both check SHA-256 digests and
//! the session's byte counters (from the eBPF session map on the kernel
//! path), and what the agent's memory does meanwhile (split from
//! datapath.rs, which has the byte-exact transfers).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::{DataPath, ForwardFixture};
use tcpgate_tests::{
    Payload, SlowReader, accept_loop, read_to_end_hashed, serve_once, write_payload,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

tcpgate_tests::on_every_path!(thousand_concurrent_sessions, slow_reader_gets_backpressure);

/// 1,000 sessions live at once, each with its own payload echoed back.
fn thousand_concurrent_sessions(path: DataPath) -> Result<()> {
    const SESSIONS: usize = 1000;
    const SIZE: u64 = 32 * KIB;
    tcpgate_tests::raise_nofile();
    let fx = ForwardFixture::start(path)?;
    let echo = accept_loop(
        &fx.topo.target,
        fx.upstream_addr(),
        SESSIONS,
        |mut stream, _| -> Result<()> {
            let mut data = Vec::new();
            stream.read_to_end(&mut data)?;
            stream.write_all(&data)?;
            stream.shutdown(Shutdown::Write)?;
            Ok(())
        },
    )?;
    let rss_idle = tcpgate_tests::rss_bytes(fx.agent.pid())?;
    let mut clients = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let mut client = fx.dial().with_context(|| format!("dial #{i}"))?;
        write_payload(&mut client, &Payload::new(i as u64, SIZE))?;
        clients.push(client);
    }
    // All open, none closed: they are live together.
    let opened = tcpgate_tests::wait_events(&fx.agent, "session_open", SESSIONS)?;
    ensure!(opened.len() == SESSIONS, "{} sessions opened", opened.len());
    let rss_busy = tcpgate_tests::rss_bytes(fx.agent.pid())?;
    eprintln!(
        "agent RSS: {} KiB idle, {} KiB with {SESSIONS} live sessions ({} bytes per session) on the {} path",
        rss_idle / 1024,
        rss_busy / 1024,
        rss_busy.saturating_sub(rss_idle) / SESSIONS as u64,
        path.name()
    );
    ensure!(
        fx.wait_closed(0)?.is_empty(),
        "no session may have closed yet"
    );
    tcpgate_tests::payload::check_echoed(&mut clients, SIZE)?;
    echo.stop()?.into_iter().collect::<Result<Vec<()>>>()?;
    for event in fx.wait_closed(SESSIONS)? {
        fx.assert_bytes(&event, SIZE, SIZE)?;
    }
    fx.assert_maps_empty()
}

/// An upstream that reads slowly: the client is held back, nothing is lost,
/// and the agent does not buffer the difference.
fn slow_reader_gets_backpressure(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    let upload = Payload::new(700, 64 * MIB);
    let server = serve_once(
        &fx.topo.target,
        fx.upstream_addr(),
        move |stream, _| -> Result<_> {
            let mut slow = SlowReader::new(stream, 64 * 1024, Duration::from_millis(2));
            read_to_end_hashed(&mut slow).map_err(Into::into)
        },
    )?;
    let baseline = tcpgate_tests::rss_bytes(fx.agent.pid())?;
    let pid = fx.agent.pid();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        for _ in 0..200 {
            peak = peak.max(tcpgate_tests::rss_bytes(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(25));
        }
        peak
    });
    let mut client = fx.dial()?;
    write_payload(&mut client, &upload)?;
    client.shutdown(Shutdown::Write)?;
    let (len, digest) = server.join()??;
    ensure!(
        len == upload.len && digest == upload.digest(),
        "slow reader got {len} bytes"
    );
    let peak = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    ensure!(
        peak.saturating_sub(baseline) < 16 * MIB,
        "agent memory grew by {} KiB while the reader lagged 64 MiB behind",
        peak.saturating_sub(baseline) / 1024
    );
    fx.assert_bulk_bytes(&fx.wait_closed(1)?[0], upload.len, 0)?;
    fx.assert_maps_empty()
}
