//! Many sessions at once: the agent's memory with thousands of idle
//! sessions, and how fast sessions end when their grant expires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail, ensure};
use tcpgate_tests::Netns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::auth::{Grant, authenticate};
use super::interrupt;
use super::servers::Shared;

/// Connections being opened at once.
const OPENING: usize = 128;
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Resident memory of `pid` in bytes (VmRSS in /proc/<pid>/status).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Opens one session: connect, optional preamble (and the agent's ok), then
/// `hello` echoed back by the target, which proves the upstream leg exists.
pub(super) async fn open(
    addr: SocketAddr,
    preamble: Option<&[u8]>,
    hello: &[u8],
) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await.context("connect")?;
    if let Some(preamble) = preamble {
        authenticate(&mut stream, preamble).await?;
    }
    stream.write_all(hello).await?;
    let mut back = vec![0u8; hello.len()];
    stream.read_exact(&mut back).await.context("echo")?;
    ensure!(back == hello, "echo altered");
    Ok(stream)
}

/// Opens `count` sessions with bounded concurrency on the current runtime.
pub(super) async fn open_all(
    addr: SocketAddr,
    preamble: Option<Vec<u8>>,
    count: u32,
    hello: fn(u32) -> Vec<u8>,
) -> Result<Vec<(u32, TcpStream)>> {
    let gate = Arc::new(Semaphore::new(OPENING));
    let preamble = Arc::new(preamble);
    let mut tasks = Vec::with_capacity(count as usize);
    for i in 0..count {
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let preamble = Arc::clone(&preamble);
        tasks.push(tokio::spawn(async move {
            let opened =
                tokio::time::timeout(OPEN_TIMEOUT, open(addr, preamble.as_deref(), &hello(i)))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
            drop(permit);
            opened.map(|s| (i, s))
        }));
    }
    let mut streams = Vec::with_capacity(count as usize);
    for (i, task) in tasks.into_iter().enumerate() {
        let stream = task
            .await?
            .with_context(|| format!("opening session {i} of {count} to {addr}"))?;
        streams.push(stream);
    }
    Ok(streams)
}

/// Agent RSS before and with `count` idle sessions open.
#[derive(Debug, Clone, Copy)]
pub struct IdleRss {
    pub before: u64,
    pub with_sessions: u64,
}

impl IdleRss {
    /// Bytes per session: the growth over `opened` sessions.
    pub fn per_session(&self, opened: u32) -> f64 {
        self.with_sessions.saturating_sub(self.before) as f64 / f64::from(opened.max(1))
    }

    /// The RSS at `target` sessions, linear in the measured growth; exactly
    /// the measured RSS when `target == opened`.
    pub fn extrapolated(&self, opened: u32, target: u32) -> f64 {
        if opened == target {
            return self.with_sessions as f64;
        }
        self.before as f64 + self.per_session(opened) * f64::from(target)
    }
}

/// Opens `count` idle sessions from `runner` to `addr` (a [`Hold`] server
/// behind the agent `agent_pid`), reads the agent's RSS, then closes them.
///
/// [`Hold`]: super::servers::Behaviour::Hold
pub fn idle_rss(
    runner: &Netns,
    agent_pid: u32,
    addr: SocketAddr,
    preamble: Option<Vec<u8>>,
    count: u32,
    shared: &Shared,
) -> Result<IdleRss> {
    let before = rss_bytes(agent_pid)?;
    let (opened_tx, opened_rx) = mpsc::channel::<Result<()>>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let thread = runner.spawn_thread(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            match open_all(addr, preamble, count, |_| b"i".to_vec()).await {
                Ok(streams) => {
                    let _ = opened_tx.send(Ok(()));
                    // Hold every session until the RSS has been read.
                    let _ = tokio::task::spawn_blocking(move || release_rx.recv()).await;
                    drop(streams);
                }
                Err(err) => {
                    let _ = opened_tx.send(Err(err));
                }
            }
        });
        Ok(())
    })?;
    let opened = opened_rx
        .recv_timeout(Duration::from_secs(120))
        .context("opening the idle sessions took over 120 s");
    let measured = opened.and_then(|opened| {
        opened?;
        let held = shared.held.load(std::sync::atomic::Ordering::SeqCst);
        ensure!(
            held >= count as usize,
            "the target holds {held} of {count} sessions"
        );
        // Let allocator and socket buffers settle after the burst.
        std::thread::sleep(Duration::from_millis(500));
        rss_bytes(agent_pid)
    });
    let _ = release_tx.send(());
    thread.join()?;
    Ok(IdleRss {
        before,
        with_sessions: measured?,
    })
}

/// Teardown latencies in milliseconds: for each of `count` sessions under
/// `grant`, from the grant's `expires_at` to the later of the two ends
/// (runner and target) seeing the connection end.
pub fn teardown(
    runner: &Netns,
    addr: SocketAddr,
    grant: &Grant,
    count: u32,
    shared: &Shared,
) -> Result<Vec<f64>> {
    if let Ok(mut ended) = shared.ended.lock() {
        ended.clear();
    }
    let expires_at = grant.expires_at;
    let client_ends = runner.spawn_thread(move || -> Result<Vec<(u32, SystemTime)>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let streams = open_all(addr, None, count, |i| i.to_be_bytes().to_vec()).await?;
            ensure!(
                SystemTime::now() < expires_at,
                "opening {count} sessions outlasted the grant; give it a longer lifetime"
            );
            let mut waits = Vec::with_capacity(streams.len());
            for (i, mut stream) in streams {
                waits.push(tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(1..) = stream.read(&mut buf).await {}
                    (i, SystemTime::now())
                }));
            }
            let mut ends = Vec::with_capacity(waits.len());
            for wait in waits {
                ends.push(wait.await?);
            }
            Ok(ends)
        })
    })?;
    // The client thread returns once every session ended; bound the wait.
    let deadline = Instant::now() + until(expires_at) + Duration::from_secs(30);
    while !client_ends.is_finished() {
        interrupt::check()?;
        if Instant::now() > deadline {
            bail!("sessions still open 30 s after their grant expired");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let client_ends = client_ends.join()?;
    // The target notes its ends in the same instant or shortly after.
    let settle = Instant::now() + Duration::from_secs(5);
    let server_ends = loop {
        let ended = shared.ended.lock().map(|e| e.clone()).unwrap_or_default();
        if ended.len() >= count as usize || Instant::now() > settle {
            break ended;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    ensure!(
        server_ends.len() == count as usize,
        "the target saw {} of {count} sessions end",
        server_ends.len()
    );
    let mut server_at = vec![None; count as usize];
    for end in server_ends {
        if let Some(slot) = server_at.get_mut(end.session as usize) {
            *slot = Some(end.at);
        }
    }
    let mut latencies = Vec::with_capacity(count as usize);
    for (i, client_at) in client_ends {
        let server =
            server_at[i as usize].with_context(|| format!("session {i}: no target end"))?;
        let both = client_at.max(server);
        let latency = both
            .duration_since(expires_at)
            .with_context(|| format!("session {i} ended before its grant expired"))?;
        latencies.push(latency.as_secs_f64() * 1e3);
    }
    Ok(latencies)
}

fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_in_bytes() {
        let status = "Name:\ttcpgate\nVmPeak:\t  9000 kB\nVmRSS:\t    8192 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(8 * 1024 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn rss_extrapolates_from_the_growth() {
        let rss = IdleRss {
            before: 10 << 20,
            with_sessions: (10 << 20) + 9_900 * 2048,
        };
        assert_eq!(rss.per_session(9_900), 2048.0);
        assert_eq!(
            rss.extrapolated(9_900, 10_000),
            f64::from((10 << 20) + 10_000 * 2048)
        );
        assert_eq!(rss.extrapolated(9_900, 9_900), rss.with_sessions as f64);
    }

    #[test]
    fn own_rss_is_readable() {
        let rss = rss_bytes(std::process::id()).expect("own status");
        assert!(rss > 0);
    }
}
