//! The chaos clients: exact transfers checked at both ends, and
//! open-ended streams that run until told to stop.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use tcpgate_tests::{Payload, read_exact_hashed};

use super::upstream::Report;
use super::wire::{Kind, Leg, Order, Spec, drain_leg, read_counting, send_leg};

/// What a client saw of a transfer.
#[derive(Debug, Clone)]
pub struct Transferred {
    pub sent: Leg,
    pub received: Leg,
}

/// Runs `spec` (a `Transfer`) as the client on a connected stream, and
/// checks the ends: exact counts, nothing after them but the FIN.
pub fn run_transfer(mut stream: TcpStream, spec: &Spec) -> Result<Transferred> {
    let Kind::Transfer {
        order,
        client_early_fin,
        ..
    } = spec.kind
    else {
        bail!("not a transfer: {spec:?}");
    };
    stream.write_all(&spec.encode()).context("header")?;
    let owned = *spec;
    let send = move |stream: &mut TcpStream| {
        let sent = send_leg(stream, owned.up_payload(), None, None);
        if client_early_fin {
            let _ = stream.shutdown(Shutdown::Write);
        }
        sent
    };
    let (sent, received) = match order {
        Order::ClientFirst => {
            let sent = send(&mut stream);
            (sent, drain_leg(&mut stream, Some(spec.down)))
        }
        Order::ServerFirst => {
            let received = drain_leg(&mut stream, Some(spec.down));
            (send(&mut stream), received)
        }
        Order::Both => {
            let mut writer = stream.try_clone()?;
            let sending = std::thread::spawn(move || send(&mut writer));
            let received = drain_leg(&mut stream, Some(spec.down));
            let sent = sending
                .join()
                .map_err(|_| anyhow::anyhow!("client writer panicked"))?;
            (sent, received)
        }
    };
    if let Some(e) = sent.error.as_ref().or(received.error.as_ref()) {
        bail!(
            "session {:#x} failed: {e} (sent {sent:?}, received {received:?})",
            spec.seed
        );
    }
    if !client_early_fin {
        stream.shutdown(Shutdown::Write)?;
    }
    let extra = drain_leg(&mut stream, None);
    ensure!(
        extra.bytes == 0 && extra.error.is_none(),
        "session {:#x}: {} bytes after the reply, then {:?}",
        spec.seed,
        extra.bytes,
        extra.error
    );
    ensure!(
        sent.bytes == spec.up && received.bytes == spec.down,
        "session {:#x}: sent {} of {}, received {} of {}",
        spec.seed,
        sent.bytes,
        spec.up,
        received.bytes,
        spec.down
    );
    ensure!(
        received.digest == spec.down_payload().digest(),
        "session {:#x}: the reply's SHA-256 differs from the upstream's payload",
        spec.seed
    );
    Ok(Transferred { sent, received })
}

/// Checks the upstream's side of a finished transfer against the client's.
pub fn check_upstream(report: &Report, client: &Transferred) -> Result<()> {
    let seed = report.spec.map_or(0, |s| s.seed);
    ensure!(
        report.received.error.is_none() && report.sent.error.is_none(),
        "upstream side of session {seed:#x} failed: {report:?}"
    );
    ensure!(
        report.received.bytes == client.sent.bytes && report.received.digest == client.sent.digest,
        "session {seed:#x}: the upstream received {} bytes whose SHA-256 differs from the {} the client sent",
        report.received.bytes,
        client.sent.bytes
    );
    ensure!(
        report.sent.digest == client.received.digest,
        "session {seed:#x}: the client's SHA-256 of the reply differs from what the upstream sent"
    );
    Ok(())
}

/// Reads an exact-length greeting-free echo check: used by health probes.
pub fn echo_roundtrip(stream: &mut TcpStream, seed: u64, len: u64) -> Result<()> {
    stream.write_all(&Spec::of(Kind::Echo, seed, 0, 0, 0).encode())?;
    let payload = Payload::new(seed, len);
    tcpgate_tests::write_payload(stream, &payload)?;
    ensure!(
        read_exact_hashed(stream, len)? == payload.digest(),
        "echo of {len} bytes came back different"
    );
    stream.shutdown(Shutdown::Write)?;
    let extra = drain_leg(stream, None);
    ensure!(extra.bytes == 0, "bytes after the echo");
    Ok(())
}

/// An open-ended echo stream: the writer sends until told to stop, the
/// reader hashes what comes back and checks it against what was sent.
pub struct EchoClient {
    pub seed: u64,
    stop: Arc<AtomicBool>,
    pub received_bytes: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<Leg>,
    reader: std::thread::JoinHandle<(Leg, Option<String>, Instant)>,
    /// When the reader saw the stream end (EOF or error).
    ended: Arc<OnceLock<Instant>>,
}

/// How an echo stream went, from the client's side.
#[derive(Debug)]
pub struct Echoed {
    pub sent: Leg,
    pub received: Leg,
    /// Where what came back first differs from what was sent, if it does.
    pub difference: Option<String>,
    /// When the reader saw the end.
    pub ended: Instant,
}

impl EchoClient {
    /// An echo stream at full speed.
    pub fn start(stream: TcpStream, seed: u64) -> Result<Self> {
        Self::start_with(stream, Spec::of(Kind::Echo, seed, 0, 0, 0), None)
    }

    /// An echo stream that sends at most `rate` bytes per second.
    pub fn start_paced(stream: TcpStream, seed: u64, rate: u64) -> Result<Self> {
        Self::start_with(stream, Spec::of(Kind::Echo, seed, 0, 0, 0), Some(rate))
    }

    /// Streams the up payload of `spec` until stopped, whatever the
    /// upstream does with it (echo, reset, stall).
    pub fn start_with(mut stream: TcpStream, spec: Spec, pace: Option<u64>) -> Result<Self> {
        let seed = spec.seed;
        stream.write_all(&spec.encode())?;
        let stop = Arc::new(AtomicBool::new(false));
        let received_bytes = Arc::new(AtomicU64::new(0));
        let mut write_half = stream.try_clone()?;
        let payload = Payload::new(seed, u64::MAX);
        let writer = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let sent = send_leg(&mut write_half, payload, Some(&stop), pace);
                let _ = write_half.shutdown(Shutdown::Write);
                sent
            })
        };
        let ended = Arc::new(OnceLock::new());
        let expected = (spec.kind == Kind::Echo).then_some(payload);
        let reader = {
            let (progress, ended) = (Arc::clone(&received_bytes), Arc::clone(&ended));
            std::thread::spawn(move || {
                let (leg, difference) = read_counting(&mut stream, &progress, expected);
                let at = *ended.get_or_init(Instant::now);
                (leg, difference, at)
            })
        };
        Ok(Self {
            seed,
            stop,
            received_bytes,
            writer,
            reader,
            ended,
        })
    }

    /// Tells the writer to finish (then half-close).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the writer and waits for both threads.
    pub fn join(self) -> Result<Echoed> {
        self.stop();
        let sent = self
            .writer
            .join()
            .map_err(|_| anyhow::anyhow!("echo writer panicked"))?;
        let (received, difference, ended) = self
            .reader
            .join()
            .map_err(|_| anyhow::anyhow!("echo reader panicked"))?;
        Ok(Echoed {
            sent,
            received,
            difference,
            ended,
        })
    }

    /// When the reader saw the stream end, if it has.
    pub fn ended_at(&self) -> Option<Instant> {
        self.ended.get().copied()
    }
}
