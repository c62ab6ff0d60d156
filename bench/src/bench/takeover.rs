//! Issue 15's figures: an agent holding 1,000 idle sessions and 8
//! streaming ones is replaced by `tcpgate run --takeover` (what the unit's
//! supervisor starts on `systemctl reload`). Measured: from starting the
//! successor to its READY=1 (it then accepts on the inherited listeners),
//! and the longest gap between two reads any streaming session sees while
//! it happens (the streams run from before the start to after ready).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use tcpgate_tests::{Agent, Netns, preamble};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::auth::Keys;
use super::contender::{self, target_bind};
use super::phases::Bench;
use super::ports;
use super::results::{Metric, Results};
use super::settings::Measure;
use super::{interrupt, sessions};

/// Streaming sessions, each a 16 KiB echo ping-pong.
const STREAMS: usize = 8;
const CHUNK: usize = 16 * 1024;
/// Streaming before the successor starts and after it is ready.
const BEFORE: Duration = Duration::from_millis(300);
const AFTER: Duration = Duration::from_millis(500);
const SUBJECT: &str = "tcpgate-ebpf";

pub fn measure(bench: &Bench<'_>, results: &mut Results) -> Result<()> {
    let s = bench.settings;
    if !s.wants(Measure::Takeover) {
        return Ok(());
    }
    for rep in 0..s.takeover_runs {
        interrupt::check()?;
        let socket = bench.env.work_dir.join(format!("takeover-{rep}.sock"));
        let agent_lines = format!(
            "takeover_socket = {:?}\ntakeover_timeout = \"20s\"\n",
            socket.display().to_string()
        );
        let sections = bench.keys.map(Keys::agent_sections);
        let agent = contender::start_agent_tuned(
            &bench.env,
            "ebpf",
            &agent_lines,
            &contender::agent_config_extra(sections.as_deref()),
        )?;
        let preamble = bench.keys.map(|keys| preamble::encode(&keys.token(3600)));
        let load = Load::start(&bench.env.topo.runner, preamble, s.takeover_idle)?;
        std::thread::sleep(BEFORE);
        load.takeover_starts();
        let started = Instant::now();
        let successor = start_successor(bench, &agent)?;
        let took = started.elapsed().as_secs_f64() * 1e3;
        std::thread::sleep(AFTER);
        let pauses = load.finish()?;
        let longest = pauses.iter().map(|p| p.during).fold(0.0, f64::max);
        let baseline = pauses.iter().map(|p| p.before).fold(0.0, f64::max);
        results.add(Metric::TakeoverTime, SUBJECT, took);
        results.add(Metric::TakeoverPause, SUBJECT, longest);
        bench.progress(&format!(
            "run {}/{} takeover with {} idle + {STREAMS} streaming sessions: ready in {took:.0} ms, \
             longest stream pause {longest:.1} ms (in the {} ms before: {baseline:.1} ms)",
            rep + 1,
            s.takeover_runs,
            s.takeover_idle,
            BEFORE.as_millis(),
        ));
        drop(successor);
        drop(agent);
    }
    Ok(())
}

/// `tcpgate run --takeover` with the running agent's configuration; returns
/// once it is ready.
fn start_successor(bench: &Bench<'_>, agent: &Agent) -> Result<Agent> {
    let config = std::fs::read_to_string(agent.config_path())?;
    let successor = Agent::builder(&bench.env.topo.bastion)?
        .binary(bench.env.agent_binary)
        .config(config)
        .arg("--takeover")
        .args(["--datapath", "ebpf"])
        .env("TCPGATE_LOG", "warn")
        .ready_timeout(Duration::from_secs(60))
        .spawn()
        .context("starting the successor")?;
    if let Some(cgroup) = bench.env.cgroup {
        cgroup.adopt(successor.pid())?;
    }
    Ok(successor)
}

/// Idle sessions held and streaming sessions running, in the runner
/// namespace, on one current-thread runtime.
struct Load {
    stop: Arc<AtomicBool>,
    /// Set when the successor starts: gaps before it are the baseline.
    during: Arc<AtomicBool>,
    thread: tcpgate_tests::netns::NsThread<Result<Vec<Pauses>>>,
}

impl Load {
    fn start(runner: &Netns, preamble: Option<Vec<u8>>, idle: u32) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let during = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let flags = (Arc::clone(&stop), Arc::clone(&during));
        let thread = runner.spawn_thread(move || -> Result<Vec<Pauses>> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run_load(preamble, idle, flags, ready_tx))
        })?;
        if ready_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            stop.store(true, Ordering::Release);
            thread.join().context("opening the sessions")?;
            bail!("opening the sessions took over 120 s");
        }
        Ok(Load {
            stop,
            during,
            thread,
        })
    }

    /// From now on, gaps count as during the takeover.
    fn takeover_starts(&self) {
        self.during.store(true, Ordering::Release);
    }

    /// Stops the streams; each one's longest pauses.
    fn finish(self) -> Result<Vec<Pauses>> {
        self.stop.store(true, Ordering::Release);
        self.thread.join()
    }
}

/// One stream's longest gap between two reads, in milliseconds, before
/// the successor started (the baseline) and from then on.
#[derive(Debug, Clone, Copy, Default)]
struct Pauses {
    before: f64,
    during: f64,
}

async fn run_load(
    preamble: Option<Vec<u8>>,
    idle: u32,
    (stop, during): (Arc<AtomicBool>, Arc<AtomicBool>),
    ready: mpsc::Sender<()>,
) -> Result<Vec<Pauses>> {
    let held = sessions::open_all(target_bind(ports::IDLE), preamble.clone(), idle, |_| {
        b"i".to_vec()
    })
    .await?;
    let echo: SocketAddr = target_bind(ports::ECHO_INTERCEPTED);
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let stream = sessions::open(echo, preamble.as_deref(), b"s").await?;
        let flags = (Arc::clone(&stop), Arc::clone(&during));
        streams.push(tokio::spawn(stream_until(stream, flags)));
    }
    let _ = ready.send(());
    let mut pauses = Vec::with_capacity(STREAMS);
    for stream in streams {
        pauses.push(stream.await??);
    }
    drop(held);
    Ok(pauses)
}

/// Echo ping-pong of [`CHUNK`] bytes until `stop`; the longest times
/// between two reads. Every echoed byte is checked.
async fn stream_until(
    mut stream: TcpStream,
    (stop, during): (Arc<AtomicBool>, Arc<AtomicBool>),
) -> Result<Pauses> {
    let mut buf = vec![0u8; CHUNK];
    let mut last = Instant::now();
    let mut pauses = Pauses::default();
    let mut round = 0u8;
    while !stop.load(Ordering::Acquire) {
        round = round.wrapping_add(1);
        stream.write_all(&[round; CHUNK]).await?;
        let mut got = 0;
        while got < CHUNK {
            let n = stream.read(&mut buf[..CHUNK - got]).await?;
            ensure!(n > 0, "the stream ended during the takeover");
            ensure!(buf[..n].iter().all(|b| *b == round), "echo altered");
            got += n;
            let now = Instant::now();
            let gap = (now - last).as_secs_f64() * 1e3;
            let longest = if during.load(Ordering::Acquire) {
                &mut pauses.during
            } else {
                &mut pauses.before
            };
            *longest = longest.max(gap);
            last = now;
        }
    }
    Ok(pauses)
}
