//! Half-closes at awkward moments, found by the soak (random orders and
//! early FINs under concurrency) and reduced here to focused cases on the
//! kernel path.
//!
//! 1. A half-close that lands while data still waits to be sent to the
//!    same socket.
//!
//! The upstream sends 64 MiB while the client reads nothing, so most of it
//! is redirected but still queued for the agent's client socket; then the
//! client half-closes, and only then reads. Every byte must arrive, then
//! EOF. The kernel queues a passed skb behind the redirected ones when that
//! queue is not empty, and its backlog worker takes a zero-length skb (the
//! FIN) for a broken pipe: `EPIPE` on the client socket, transmission
//! stopped, the rest of the stream lost and the session reset.
//!
//! 2. Clients that write and half-close at once, many at a time: a FIN can
//!    land between the agent's check that both sockets are established and
//!    their insertion into the SOCKHASH, which then refuses the socket
//!    (`EOPNOTSUPP`). Such a session must fall back to the user-space copy,
//!    not be reset as an internal error.

use std::io::Write as _;
use std::net::Shutdown;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use rand::Rng as _;

use super::client::run_transfer;
use super::fixture::{Fixture, Options};
use super::mode::{Case, mib};
use super::wire::{Kind, Order, Spec, drain_leg};

const DOWN: u64 = 64 * 1024 * 1024;

pub fn run_queued(case: &mut Case) -> Result<()> {
    // The whole stream must sit in the kernel's queue for the client socket,
    // so backpressure (which would stop redirecting past 16 MiB) is set
    // above it.
    let fx = Fixture::start(Options::ebpf().agent("splice_queue_limit = 268435456"))?;
    for round in 0..case.scale.pick(3, 10) {
        let spec = Spec::of(
            Kind::Transfer {
                order: Order::ServerFirst,
                client_early_fin: true,
                server_early_fin: false,
            },
            case.rng.random(),
            0,
            DOWN,
            0,
        );
        let mut stream = fx.dial()?;
        let source = stream.local_addr()?.to_string();
        stream.write_all(&spec.encode())?;
        wait_redirected(&fx, &source)?;
        stream.shutdown(Shutdown::Write)?;
        let received = drain_leg(&mut stream, None);
        let closed = fx.wait_audit("session_close", round + 1, Duration::from_secs(20))?;
        let event = closed.iter().find(|e| e["source"] == source);
        ensure!(
            received.error.is_none()
                && received.bytes == DOWN
                && received.digest == spec.down_payload().digest(),
            "round {round}: the client received {} of {} after its half-close ({:?}); agent: {event:?}",
            mib(received.bytes),
            mib(DOWN),
            received.error
        );
        let report = fx
            .upstream
            .ledger
            .wait_for(spec.seed, Duration::from_secs(20))?;
        ensure!(
            report.received.error.is_none() && report.sent.error.is_none(),
            "round {round}: the upstream's end failed: {report:?}"
        );
    }
    fx.wait_idle()
}

/// Waits until the agent has redirected the whole download toward the
/// client, which has read none of it: most of it is queued in the kernel.
fn wait_redirected(fx: &Fixture, source: &str) -> Result<()> {
    let mut down = None;
    tcpgate_tests::eventually(
        Duration::from_secs(20),
        "the whole download redirected toward the client",
        || -> Result<bool> {
            down = fx
                .live_sessions()?
                .iter()
                .find(|s| s["client"] == source)
                .and_then(|s| s["bytes_down"].as_u64());
            Ok(down == Some(DOWN))
        },
    )
    .with_context(|| format!("only {down:?} of {DOWN} bytes were redirected toward the client"))
}

pub fn run_immediate(case: &mut Case) -> Result<()> {
    let sessions = case.scale.pick(400, 1_500);
    let fx = Fixture::start(Options::ebpf())?;
    let specs: Vec<Spec> = (0..sessions)
        .map(|_| {
            let kind = Kind::Transfer {
                order: Order::ClientFirst,
                client_early_fin: true,
                server_early_fin: case.rng.random_bool(0.5),
            };
            let (up, down) = (
                case.rng.random_range(0..65_536),
                case.rng.random_range(0..65_536),
            );
            Spec::of(kind, case.rng.random(), up, down, 0)
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let next = || next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                while let Some(spec) = specs.get(next()) {
                    if let Err(e) = fx.dial().and_then(|stream| run_transfer(stream, spec)) {
                        failures
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(format!("{e:#}"));
                    }
                }
            });
        }
    });
    let failures = failures
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let closes = fx.wait_audit("session_close", sessions, Duration::from_secs(30))?;
    let copied = closes
        .iter()
        .filter(|e| e["datapath"] == "userspace")
        .count();
    let raced = fx
        .agent
        .logs()
        .matches("half-closed during the splice setup")
        .count();
    case.figure(
        "immediate half-closes",
        format!(
            "{sessions} sessions, 8 at a time: {copied} copied in user space, {raced} of them after a FIN raced the SOCKHASH insertion"
        ),
    );
    ensure!(
        failures.is_empty(),
        "{} of {sessions} sessions failed, e.g. {:?}; resets: {:?}",
        failures.len(),
        failures.first(),
        closes
            .iter()
            .filter(|e| e["reason"] == "internal_error")
            .map(|e| e["detail"].clone())
            .take(3)
            .collect::<Vec<_>>()
    );
    fx.wait_idle()
}
