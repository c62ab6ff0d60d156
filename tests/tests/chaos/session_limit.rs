//! Case 4: the session map is full. With a small `agent.max_sessions`, as
//! many echo streams as the limit allows stream without pause; every
//! further connection is refused (a reset, a clear log line, the
//! `session_limit` reason in the audit and the metrics) and never reaches
//! the upstream, while the live streams keep moving byte-exact. Once they
//! end, the slots are free again.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use rand::Rng as _;

use super::client::echo_roundtrip;
use super::fixture::{Fixture, Options, denial_reasons, denied_metrics, dial_raw, service};
use super::mode::{Case, mib};
use super::streams::Streams;
use super::wire::{Kind, Spec};

pub fn run(case: &mut Case) -> Result<()> {
    let limit = case.scale.pick(8, 16);
    let refused = 4 * limit;
    let fx = Fixture::start(Options::ebpf().agent(&format!("max_sessions = {limit}")))?;
    let streams = Streams::start(&fx, limit, case.rng.random(), Some(8 * 1024 * 1024))?;
    wait_gauge(&fx, limit)?;
    streams.wait_progress(1024 * 1024, Duration::from_secs(20))?;
    if fx.is_ebpf() {
        let pinned = fx.map_len("sessions")?;
        ensure!(
            pinned == limit,
            "the pinned sessions map holds {pinned} records, the limit is {limit}"
        );
    }
    for i in 0..refused {
        expect_refusal(&fx, case.rng.random()).map_err(|e| e.context(format!("connection {i}")))?;
        if i % limit == 0 {
            // The live streams keep moving between the refusals.
            streams.wait_progress(64 * 1024, Duration::from_secs(20))?;
        }
    }
    let events = fx.wait_audit("connection_denied", refused, Duration::from_secs(20))?;
    let denied = denial_reasons(&events);
    case.figure(
        "refused",
        format!("{refused} connections over the limit of {limit}: {denied:?}"),
    );
    ensure!(
        denied.get("session_limit") == Some(&refused) && denied.len() == 1,
        "expected {refused} session_limit refusals: {denied:?}"
    );
    ensure!(
        events.iter().all(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("{limit} sessions already live")))),
        "the audit detail names the limit: {:?}",
        events.first()
    );
    let metrics = denied_metrics(&fx.metrics()?);
    ensure!(metrics == denied, "metrics {metrics:?}, audit {denied:?}");
    let logs = fx.agent.logs();
    let logged = logs
        .lines()
        .filter(|l| l.contains("connection denied") && l.contains("session_limit"))
        .count();
    case.figure(
        "log line",
        logs.lines()
            .find(|l| l.contains("session_limit"))
            .unwrap_or("(none)"),
    );
    ensure!(
        logged == refused,
        "{logged} log lines for {refused} refusals"
    );
    ensure!(
        fx.upstream.ledger.connections() == limit as u64,
        "the upstream saw {} connections; only the {limit} admitted ones may reach it",
        fx.upstream.ledger.connections()
    );
    streams.wait_progress(1024 * 1024, Duration::from_secs(20))?;
    let moved = streams.finish(&fx)?;
    case.figure(
        "live streams",
        format!("{} moved byte-exact while full", mib(moved)),
    );
    fx.wait_idle()?;
    // The slots are free again.
    let mut again = fx.dial()?;
    echo_roundtrip(&mut again, case.rng.random(), 64 * 1024)?;
    drop(again);
    fx.wait_idle()
}

fn wait_gauge(fx: &Fixture, live: usize) -> Result<()> {
    let mut gauge = f64::NAN;
    tcpgate_tests::eventually(
        Duration::from_secs(20),
        &format!("tcpgate_sessions_live to read {live}"),
        || -> Result<bool> {
            gauge = fx.sessions_live_gauge()?;
            Ok(gauge == live as f64)
        },
    )
    .with_context(|| format!("tcpgate_sessions_live is {gauge}, expected {live}"))
}

/// A connection over the limit: accepted by the kernel, then reset by the
/// agent without a byte.
fn expect_refusal(fx: &Fixture, seed: u64) -> Result<()> {
    let mut stream = match dial_raw(&fx.topo.runner, service()) {
        Ok(stream) => stream,
        // The reset can beat the end of the connect itself.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    // The header goes out (or fails on the reset); nothing may come back.
    let _ = stream.write_all(&Spec::of(Kind::Echo, seed, 0, 0, 0).encode());
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Ok(n) => anyhow::bail!("a refused connection received {n} bytes"),
        Err(e) => anyhow::bail!("a refused connection was not closed: {e}"),
    }
}
