//! New connections per second: a load generator on the runner with bounded
//! concurrency and duration. One cycle is connect → (token preamble, wait
//! for the agent's ok) → one byte echoed by the target → the target's EOF
//! → close. Only completed cycles count.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use tcpgate_tests::Netns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::auth::authenticate;

/// Load generator threads, each with its own single-threaded runtime
/// inside the runner namespace (sockets are created in the namespace of
/// the thread that creates them).
const THREADS: usize = 2;
/// A cycle that takes longer than this counts as failed.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

#[derive(Debug, Clone)]
pub struct Rate {
    /// Completed cycles per second within the counted window.
    pub per_second: f64,
    /// Completed and failed cycles within the counted window.
    pub completed: u64,
    pub failed: u64,
    /// Every cycle finished, warm-up included, completed or not (for
    /// per-connection costs measured around the whole run).
    pub cycles_started: u64,
    pub first_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

/// Runs cycles against `addr`, each starting with `preamble` when given.
pub fn measure(
    runner: &Netns,
    addr: SocketAddr,
    preamble: Option<Vec<u8>>,
    load: Load,
) -> Result<Rate> {
    let counters = Arc::new(Counters::default());
    let preamble = Arc::new(preamble);
    let started = Instant::now();
    let stop_at = started + load.warmup + load.duration;
    let mut threads = Vec::new();
    for thread in 0..THREADS {
        let tasks = load.concurrency / THREADS + usize::from(thread < load.concurrency % THREADS);
        let (counters, preamble) = (Arc::clone(&counters), Arc::clone(&preamble));
        threads.push(runner.spawn_thread(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let mut workers = Vec::new();
                for _ in 0..tasks {
                    let (counters, preamble) = (Arc::clone(&counters), Arc::clone(&preamble));
                    workers.push(tokio::spawn(async move {
                        while Instant::now() < stop_at {
                            let outcome = tokio::time::timeout(
                                CYCLE_TIMEOUT,
                                cycle(addr, preamble.as_deref()),
                            )
                            .await
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("cycle timed out")));
                            match outcome {
                                Ok(()) => {
                                    counters.completed.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(err) => {
                                    counters.failed.fetch_add(1, Ordering::Relaxed);
                                    if let Ok(mut first) = counters.first_error.lock() {
                                        first.get_or_insert_with(|| format!("{err:#}"));
                                    }
                                    // Do not hammer a refusing agent.
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                }
                            }
                        }
                    }));
                }
                for worker in workers {
                    let _ = worker.await;
                }
            });
            Ok(())
        })?);
    }
    // Counted window: after the warm-up, until the stop time.
    std::thread::sleep(load.warmup);
    let at_warmup = (
        counters.completed.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(stop_at.saturating_duration_since(Instant::now()));
    let at_end = (
        counters.completed.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed),
        Instant::now(),
    );
    for thread in threads {
        thread.join()?;
    }
    let completed = at_end.0 - at_warmup.0;
    let failed = at_end.1 - at_warmup.1;
    let seconds = (at_end.2 - at_warmup.2).as_secs_f64();
    let first_error = counters.first_error.lock().ok().and_then(|e| e.clone());
    if completed == 0 {
        bail!(
            "no connection cycle to {addr} completed ({failed} failed); first error: {}",
            first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(Rate {
        per_second: completed as f64 / seconds,
        completed,
        failed,
        cycles_started: counters.completed.load(Ordering::Relaxed)
            + counters.failed.load(Ordering::Relaxed),
        first_error,
    })
}

async fn cycle(addr: SocketAddr, preamble: Option<&[u8]>) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    if let Some(preamble) = preamble {
        authenticate(&mut stream, preamble).await?;
    }
    stream.write_all(b"x").await.context("send the byte")?;
    let mut byte = [0u8; 1];
    stream
        .read_exact(&mut byte)
        .await
        .context("read the echo")?;
    ensure!(byte == *b"x", "echo altered");
    // Wait for the target's close, so the runner never holds TIME_WAIT.
    let n = stream.read(&mut byte).await.context("wait for EOF")?;
    ensure!(n == 0, "unexpected bytes after the echo");
    Ok(())
}
