//! Request/response latency: one connection, one 64-byte message in flight
//! at a time, echoed back by the target's echo server.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use tcpgate_tests::Netns;

use super::stats::{percentile, sorted};

pub const MESSAGE_LEN: usize = 64;
/// Round trips before the measured ones: warm caches, settle the path.
const WARMUP: usize = 200;

#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `round_trips` ping-pongs from `runner` to `addr`.
pub fn ping_pong(runner: &Netns, addr: SocketAddr, round_trips: usize) -> Result<Latency> {
    let samples = runner.try_run(move || measure(addr, round_trips))??;
    let samples = sorted(samples);
    Ok(Latency {
        p50_us: percentile(&samples, 50.0).context("no samples")?,
        p99_us: percentile(&samples, 99.0).context("no samples")?,
    })
}

fn measure(addr: SocketAddr, round_trips: usize) -> Result<Vec<f64>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to echo server at {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut message = [0u8; MESSAGE_LEN];
    let mut back = [0u8; MESSAGE_LEN];
    let mut samples = Vec::with_capacity(round_trips);
    for i in 0..WARMUP + round_trips {
        // A different message each time, so a stale echo cannot pass.
        message[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let started = Instant::now();
        stream.write_all(&message)?;
        stream
            .read_exact(&mut back)
            .with_context(|| format!("echo {i} through {addr}"))?;
        let took = started.elapsed();
        ensure!(back == message, "echo {i} through {addr} came back altered");
        if i >= WARMUP {
            samples.push(took.as_secs_f64() * 1e6);
        }
    }
    Ok(samples)
}
