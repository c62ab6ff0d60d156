//! A paced flood of junk connections from the runner: random bytes,
//! truncated preambles, preambles that never complete (slowloris, held
//! until the agent's preamble deadline cuts them), and resets right after
//! the handshake. The flood can be paused and resumed, so a test can
//! interleave disturbed and undisturbed rounds.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tcpgate_tests::{Netns, NsThread};

use super::wire::set_linger_zero;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Junk {
    /// 8 to 512 random bytes that do not start like a preamble, then close.
    RandomBytes,
    /// A preamble cut short (in its header or its token), then close.
    Truncated,
    /// A preamble cut short, then held open: only the deadline ends it.
    Slowloris,
    /// The handshake, then an immediate reset (SO_LINGER 0).
    ResetAfterSyn,
}

pub const ALL: [Junk; 4] = [
    Junk::RandomBytes,
    Junk::Truncated,
    Junk::Slowloris,
    Junk::ResetAfterSyn,
];

/// What the flood did so far.
#[derive(Debug, Default)]
struct Tally {
    sent: Mutex<BTreeMap<Junk, u64>>,
    connect_failures: AtomicU64,
    /// Slowloris connections the agent closed, and how long each was held.
    cut: Mutex<Vec<Duration>>,
    /// Slowloris connections the agent answered with bytes (it must not).
    answered: AtomicU64,
    held: AtomicU64,
}

pub struct Flood {
    running: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    workers: Vec<NsThread<()>>,
    reaper: Option<std::thread::JoinHandle<Vec<Duration>>>,
}

/// What the flood did, once stopped.
#[derive(Debug)]
pub struct FloodReport {
    pub sent: BTreeMap<Junk, u64>,
    pub connect_failures: u64,
    /// Hold time of every slowloris connection the agent cut.
    pub cut: Vec<Duration>,
    /// Slowloris connections still open when the flood gave up on them.
    pub never_cut: Vec<Duration>,
    pub answered: u64,
}

impl FloodReport {
    pub fn total(&self) -> u64 {
        self.sent.values().sum()
    }

    pub fn of(&self, kind: Junk) -> u64 {
        self.sent.get(&kind).copied().unwrap_or(0)
    }
}

impl Flood {
    /// Prepares `workers` threads in `ns` that, once resumed, open `rate`
    /// junk connections per second in all to `target`. Slowloris
    /// connections are given up on after `hold_limit`.
    pub fn new(
        ns: &Netns,
        target: SocketAddr,
        rate: u32,
        workers: u32,
        seed: u64,
        hold_limit: Duration,
    ) -> Result<Self> {
        let running = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let (held_tx, held_rx) = mpsc::channel();
        let period = Duration::from_secs_f64(f64::from(workers) / f64::from(rate));
        let mut threads = Vec::new();
        for index in 0..workers {
            let (running, stop, tally) =
                (Arc::clone(&running), Arc::clone(&stop), Arc::clone(&tally));
            let held_tx = held_tx.clone();
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(u64::from(index)));
            threads.push(ns.spawn_thread(move || {
                let mut next = None;
                while !stop.load(Ordering::Relaxed) {
                    if !running.load(Ordering::Relaxed) {
                        next = None;
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let now = Instant::now();
                    let at = *next.get_or_insert(now);
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    // Pacing by deadlines keeps the rate even if one
                    // connection was slow; a long stall does not burst.
                    next = Some(at.max(now - period * 4) + period);
                    let kind = ALL[rng.random_range(0..ALL.len())];
                    match one(target, kind, &mut rng) {
                        Ok(Some(held)) => {
                            tally.held.fetch_add(1, Ordering::Relaxed);
                            let _ = held_tx.send((held, Instant::now()));
                        }
                        Ok(None) => {}
                        Err(_) => {
                            tally.connect_failures.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    *tally
                        .sent
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry(kind)
                        .or_default() += 1;
                }
            })?);
        }
        drop(held_tx);
        let reaper = {
            let tally = Arc::clone(&tally);
            std::thread::spawn(move || reap(&held_rx, &tally, hold_limit))
        };
        Ok(Self {
            running,
            stop,
            tally,
            workers: threads,
            reaper: Some(reaper),
        })
    }

    pub fn resume(&self) {
        self.running.store(true, Ordering::SeqCst);
    }

    pub fn pause(&self) {
        self.running.store(false, Ordering::SeqCst);
    }

    /// Junk connections made so far.
    pub fn sent(&self) -> u64 {
        self.tally
            .sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }

    /// Slowloris connections still held open.
    pub fn holding(&self) -> u64 {
        let cut = self
            .tally
            .cut
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64;
        self.tally.held.load(Ordering::Relaxed) - cut
    }

    /// Stops the workers, then waits (bounded by the hold limit) until the
    /// agent has cut every slowloris connection.
    pub fn finish(mut self) -> Result<FloodReport> {
        self.pause();
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            worker.join();
        }
        let never_cut = self
            .reaper
            .take()
            .map(|r| r.join())
            .transpose()
            .map_err(|_| anyhow::anyhow!("the slowloris reaper panicked"))?
            .unwrap_or_default();
        let tally = &self.tally;
        Ok(FloodReport {
            sent: tally
                .sent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            connect_failures: tally.connect_failures.load(Ordering::Relaxed),
            cut: tally
                .cut
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            never_cut,
            answered: tally.answered.load(Ordering::Relaxed),
        })
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A valid preamble header announcing `len` token bytes.
fn header(len: u16) -> Vec<u8> {
    let mut out = b"TCPG\x01\x00".to_vec();
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// A preamble cut short: part of the header, or the header and part of
/// the token it announces.
fn cut_preamble(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.random_range(2..=4096u16);
    let mut bytes = header(len);
    if rng.random_bool(0.3) {
        bytes.truncate(rng.random_range(1..8));
    } else {
        let token_bytes = rng.random_range(0..usize::from(len));
        bytes.extend((0..token_bytes).map(|_| rng.random_range(b'a'..=b'z')));
    }
    bytes
}

/// Makes one junk connection; a slowloris one is returned to be held.
fn one(target: SocketAddr, kind: Junk, rng: &mut StdRng) -> std::io::Result<Option<TcpStream>> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    match kind {
        Junk::RandomBytes => {
            let len = rng.random_range(8..=512);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if bytes[0] == b'T' {
                bytes[0] = b'X';
            }
            // The agent may already have refused and reset: not our error.
            let _ = stream.write_all(&bytes);
        }
        Junk::Truncated => {
            let _ = stream.write_all(&cut_preamble(rng));
        }
        Junk::Slowloris => {
            let _ = stream.write_all(&cut_preamble(rng));
            return Ok(Some(stream));
        }
        Junk::ResetAfterSyn => {
            set_linger_zero(&stream)?;
        }
    }
    Ok(None)
}

/// Holds slowloris connections until the agent closes them; returns the
/// ages of those it gave up on after `limit`.
fn reap(
    incoming: &mpsc::Receiver<(TcpStream, Instant)>,
    tally: &Tally,
    limit: Duration,
) -> Vec<Duration> {
    let mut held: Vec<(TcpStream, Instant)> = Vec::new();
    let mut never_cut = Vec::new();
    let mut senders_gone = false;
    loop {
        loop {
            match incoming.try_recv() {
                Ok(entry) => held.push(entry),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    senders_gone = true;
                    break;
                }
            }
        }
        let now = Instant::now();
        held.retain(|(_, since)| {
            let age = now.duration_since(*since);
            if age > limit {
                never_cut.push(age);
            }
            age <= limit
        });
        if held.is_empty() {
            if senders_gone {
                return never_cut;
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let mut fds: Vec<libc::pollfd> = held
            .iter()
            .map(|(s, _)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
        if ready <= 0 {
            continue;
        }
        let mut keep = Vec::with_capacity(held.len());
        for ((mut stream, since), fd) in held.into_iter().zip(&fds) {
            if fd.revents == 0 {
                keep.push((stream, since));
                continue;
            }
            let mut buf = [0u8; 64];
            if matches!(stream.read(&mut buf), Ok(n) if n > 0) {
                tally.answered.fetch_add(1, Ordering::Relaxed);
            }
            tally
                .cut
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(since.elapsed());
        }
        held = keep;
    }
}

/// Checks a finished flood: every connection made, every slowloris cut.
pub fn check(report: &FloodReport) -> Result<()> {
    ensure!(
        report.connect_failures == 0,
        "{} junk connections could not even connect (accept backlog overflow?)",
        report.connect_failures
    );
    ensure!(
        report.never_cut.is_empty(),
        "{} slowloris connections were never cut by the agent (held {:?})",
        report.never_cut.len(),
        report.never_cut
    );
    ensure!(
        report.answered == 0,
        "the agent sent bytes to {} slowloris connections",
        report.answered
    );
    Ok(())
}
