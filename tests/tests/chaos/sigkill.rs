//! Case 5: the agent is SIGKILLed under load, then restarted.
//!
//! Many echo streams run through the kernel path when the agent dies. Every
//! client must see its connection end within its read timeout (none hangs),
//! with what it received an exact prefix of what it sent, and the same on
//! the upstream's side. The dead agent leaves routing and pins behind; the
//! next agent's startup must remove them and say so, install exactly what
//! the first one had, and serve at once: its first session right after
//! READY must succeed (the time from spawn to that session is printed).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rand::Rng as _;
use tcpgate_tests::{Agent, Payload, Signal};

use super::client::echo_roundtrip;
use super::fixture::{CLIENT_IO_TIMEOUT, Fixture, Options};
use super::mode::{Case, mib, ms};
use super::streams::Streams;
use super::wire::HANG;
use tcpgate_tests::{routing_leftovers, sk_lookup_links};

pub fn run(case: &mut Case) -> Result<()> {
    let sessions = case.scale.pick(24, 64);
    // Declared first, dropped last: the killed agent's guard removes its
    // pin directory, which the restarted agent uses.
    let mut killed: Vec<Agent> = Vec::new();
    let mut fx = Fixture::start(Options::ebpf())?;
    let routing: BTreeSet<String> = routing_leftovers(&fx.topo.bastion)?.into_iter().collect();
    ensure!(!routing.is_empty(), "the agent installed no routing");
    ensure!(
        sk_lookup_links(&fx.topo.bastion)? == 1,
        "one sk_lookup link"
    );
    let streams = Streams::start(&fx, sessions, case.rng.random(), Some(8 * 1024 * 1024))?;
    fx.wait_audit("session_open", sessions, Duration::from_secs(30))?;
    streams.wait_progress(256 * 1024, Duration::from_secs(30))?;

    let killed_at = Instant::now();
    fx.agent.signal(Signal::SIGKILL)?;
    fx.agent
        .wait_exit(Duration::from_secs(30))?
        .context("the agent survived SIGKILL")?;
    let mut closes = Vec::new();
    let mut moved = 0;
    for client in streams.into_clients() {
        let seed = client.seed;
        let super::client::Echoed {
            sent,
            received,
            ended,
            ..
        } = client.join()?;
        ensure!(
            !received.error.as_deref().unwrap_or("").starts_with(HANG),
            "stream {seed:#x} hangs: no close within {CLIENT_IO_TIMEOUT:?} of the kill"
        );
        let payload = Payload::new(seed, u64::MAX);
        ensure!(
            received.bytes <= sent.bytes && received.is_prefix_of(payload),
            "stream {seed:#x}: the {} bytes echoed before the kill are not a prefix of the {} sent",
            received.bytes,
            sent.bytes
        );
        let upstream = fx.upstream.ledger.wait_for(seed, Duration::from_secs(30))?;
        ensure!(
            upstream.received.bytes <= sent.bytes && upstream.received.is_prefix_of(payload),
            "stream {seed:#x}: the upstream's {} bytes are not a prefix of the client's {}",
            upstream.received.bytes,
            sent.bytes
        );
        moved += received.bytes;
        closes.push(ended.saturating_duration_since(killed_at));
    }
    closes.sort();
    case.figure(
        "kill",
        format!(
            "{sessions} streams ({} echoed, every byte a verified prefix); clients saw the close {} to {} after SIGKILL (median {})",
            mib(moved),
            ms(closes[0]),
            ms(closes[closes.len() - 1]),
            ms(closes[closes.len() / 2])
        ),
    );
    ensure!(
        !routing_leftovers(&fx.topo.bastion)?.is_empty() && fx.pin_dir.join("sessions").exists(),
        "a SIGKILLed agent cannot clean up: routing and pins should be left to the next start"
    );
    let stale = fx.map_len("sessions")?;
    case.figure(
        "left behind",
        format!("{stale} session records in the pinned map, routing, pins"),
    );

    let spawned = Instant::now();
    let agent = fx.spawn_agent()?;
    let ready = spawned.elapsed();
    killed.push(std::mem::replace(&mut fx.agent, agent));
    let mut first = fx.dial()?;
    echo_roundtrip(&mut first, case.rng.random(), 64 * 1024)
        .context("the first session right after READY")?;
    let served = spawned.elapsed();
    drop(first);
    case.figure(
        "restart",
        format!(
            "READY {} after spawn; first session done {} after spawn",
            ms(ready),
            ms(served)
        ),
    );
    let logs = fx.agent.logs();
    for said in [
        "removed pins left behind by a previous agent",
        "removed routing rules and routes left by a previous agent",
    ] {
        ensure!(
            logs.contains(said),
            "the restart must report: {said}\n{logs}"
        );
    }
    let now: BTreeSet<String> = routing_leftovers(&fx.topo.bastion)?.into_iter().collect();
    ensure!(
        now == routing,
        "routing after the restart differs from the first agent's:\n{now:#?}\nvs\n{routing:#?}"
    );
    ensure!(
        sk_lookup_links(&fx.topo.bastion)? == 1,
        "exactly one sk_lookup link after the restart"
    );
    fx.wait_idle()
        .context("no stale session after the restart")?;
    let more = Streams::start(&fx, 4, case.rng.random(), Some(8 * 1024 * 1024))?;
    more.wait_progress(1024 * 1024, Duration::from_secs(20))?;
    more.finish(&fx)?;
    fx.wait_idle()?;
    let status = fx.agent.stop()?;
    ensure!(status.success(), "the restarted agent's exit: {status:?}");
    let left = routing_leftovers(&fx.topo.bastion)?;
    ensure!(
        left.is_empty() && !fx.pin_dir.exists() && sk_lookup_links(&fx.topo.bastion)? == 0,
        "left after a clean stop: {left:?}, pins {}",
        fx.pin_dir.exists()
    );
    drop(killed);
    Ok(())
}
