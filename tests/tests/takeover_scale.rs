//! 1,000 idle sessions survive a takeover: on the kernel path they stay
//! with the old agent, which drains them; on the user-space path the
//! successor adopts them. Each still answers byte-exact afterwards.

use std::io::Read;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tcpgate_tests::takeover::{
    agent_lines, echo_once, exits_by_itself, log_field, log_line, stops_cleanly, successor,
    wait_taken_over,
};
use tcpgate_tests::{
    DataPath, ForwardFixture, Payload, accept_loop, read_to_end_hashed, write_payload,
};

const SESSIONS: usize = 1000;
const SIZE: u64 = 4 * 1024;
/// First byte of the one streaming session, and of the echoed ones.
const STREAM: u8 = b'S';
const ECHO: u8 = b'E';

tcpgate_tests::on_every_path!(a_thousand_idle_sessions_survive_a_takeover);

fn a_thousand_idle_sessions_survive_a_takeover(path: DataPath) -> Result<()> {
    tcpgate_tests::raise_nofile();
    let dir = tempfile::tempdir()?;
    let mut fx = ForwardFixture::start_tuned(path, &agent_lines(dir.path()), "")?;
    let echo = accept_loop(
        &fx.topo.target,
        fx.upstream_addr(),
        SESSIONS + 1,
        |mut stream, _| -> Result<()> {
            let mut first = [0u8; 1];
            stream.read_exact(&mut first)?;
            if first[0] == STREAM {
                // The measured stream: 64 KiB chunks until the client's
                // end of file (a reader thread watches for it).
                let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let mut watch = stream.try_clone()?;
                let seen = std::sync::Arc::clone(&done);
                let watcher = std::thread::spawn(move || {
                    let mut rest = Vec::new();
                    let _ = watch.read_to_end(&mut rest);
                    seen.store(true, std::sync::atomic::Ordering::Release);
                });
                let chunk = vec![0u8; 64 * 1024];
                while !done.load(std::sync::atomic::Ordering::Acquire)
                    && std::io::Write::write_all(&mut stream, &chunk).is_ok()
                {}
                stream.shutdown(Shutdown::Write)?;
                let _ = watcher.join();
                return Ok(());
            }
            let mut data = first.to_vec();
            stream.read_to_end(&mut data)?;
            std::io::Write::write_all(&mut stream, &data)?;
            stream.shutdown(Shutdown::Write)?;
            Ok(())
        },
    )?;
    let mut clients = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let mut client = fx.dial().with_context(|| format!("dial #{i}"))?;
        std::io::Write::write_all(&mut client, &[ECHO])?;
        write_payload(&mut client, &Payload::new(i as u64, SIZE))?;
        clients.push(client);
    }
    // A session streaming through the takeover, for the figures printed
    // below (not asserted: they measure the machine as much as tcpgate).
    let mut streaming = fx.dial()?;
    std::io::Write::write_all(&mut streaming, &[STREAM])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gaps = std::thread::spawn({
        let stop = std::sync::Arc::clone(&stop);
        move || -> Result<Duration> {
            let mut buf = vec![0u8; 64 * 1024];
            let mut last = Instant::now();
            let mut longest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                if streaming.read(&mut buf)? == 0 {
                    break;
                }
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
            // End it cleanly: the server stops at our end of file.
            streaming.shutdown(Shutdown::Write)?;
            while streaming.read(&mut buf)? > 0 {}
            Ok(longest)
        }
    });
    tcpgate_tests::wait_events(&fx.agent, "session_open", SESSIONS + 1)?;
    let started = Instant::now();
    let mut next = successor(
        &fx.topo.bastion,
        fx.agent.config_path(),
        &["--datapath", path.flag()],
        &[],
    )?;
    wait_taken_over(&fx.agent)?;
    let took = started.elapsed();
    ensure!(
        fx.wait_closed(0)?.is_empty(),
        "no session ended at the takeover"
    );
    stop.store(true, std::sync::atomic::Ordering::Release);
    let longest = gaps
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    eprintln!(
        "takeover with {SESSIONS} idle sessions and one stream on the {} path: \
         {took:?} from starting the successor to the old agent draining \
         (sessions handed over first on the user-space path); longest pause in the stream from its start to the end of the takeover: {longest:?}",
        path.name()
    );
    if let Some(line) = log_line(&next, "took over") {
        eprintln!(
            "the successor: adopted={} in took_ms={}",
            log_field(&line, "adopted").unwrap_or("?"),
            log_field(&line, "took_ms").unwrap_or("?")
        );
    }
    for client in &clients {
        client.shutdown(Shutdown::Write)?;
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let mut marker = [0u8; 1];
        client.read_exact(&mut marker)?;
        ensure!(marker[0] == ECHO, "session {i}: marker");
        let (len, digest) = read_to_end_hashed(client)?;
        ensure!(
            len == SIZE && digest == Payload::new(i as u64, SIZE).digest(),
            "session {i} did not answer byte-exact after the takeover"
        );
    }
    echo.stop()?.into_iter().collect::<Result<Vec<()>>>()?;
    let closes = fx.wait_closed(SESSIONS + 1)?;
    let handover = match path {
        DataPath::Ebpf | DataPath::CopyFirst => "drained",
        DataPath::Userspace => "adopted",
    };
    for event in &closes {
        ensure!(event["handover"] == handover, "{event}");
        if event["bytes_up"] != 1 {
            fx.assert_bytes(event, SIZE + 1, SIZE + 1)?;
        }
    }
    exits_by_itself(&mut fx.agent, "the old agent exits once drained")?;
    echo_once(&fx, b"next").with_context(|| next.logs_tail(20))?;
    stops_cleanly(&mut next)?;
    Ok(())
}
