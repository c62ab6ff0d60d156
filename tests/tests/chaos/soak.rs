//! Case 6: the soak. Many sessions with random sizes (log-uniform from 0 B
//! to the maximum, so most are small and some are large, plus the edges),
//! random orders (client first, server first, both at once) and random
//! early half-closes on either side, run with bounded concurrency. Every
//! byte is checked with SHA-256 at both ends, every session's audit line
//! carries its exact byte counts, and the agent's memory returns to its
//! baseline afterwards.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use rand::Rng as _;
use rand::rngs::StdRng;

use super::client::{Transferred, check_upstream, run_transfer};
use super::fixture::{Fixture, Options};
use super::mode::{Case, mib};
use super::wire::{HEADER_LEN, Kind, Order, Spec};
use tcpgate_tests::rss_bytes;

const MIB: u64 = 1024 * 1024;
/// How far above its baseline the agent's RSS may end.
const RSS_TOLERANCE: u64 = 16 * MIB;

/// Log-uniform in `0..=max`: every order of magnitude equally likely.
fn size(rng: &mut StdRng, max: u64) -> u64 {
    let bits = rng.random_range(0.0..=(max as f64 + 1.0).log2());
    ((2f64.powf(bits) - 1.0).floor() as u64).min(max)
}

fn specs(rng: &mut StdRng, n: usize, max: u64) -> Vec<Spec> {
    let edges = [(0, 0), (max, 0), (0, max), (max, max)];
    (0..n)
        .map(|i| {
            let (up, down) = edges
                .get(i)
                .copied()
                .unwrap_or_else(|| (size(rng, max), size(rng, max)));
            let order =
                [Order::ClientFirst, Order::ServerFirst, Order::Both][rng.random_range(0..3)];
            let kind = Kind::Transfer {
                order,
                client_early_fin: rng.random_bool(0.5),
                server_early_fin: rng.random_bool(0.5),
            };
            Spec::of(kind, rng.random(), up, down, 0)
        })
        .collect()
}

type Done = Vec<(Spec, SocketAddr, Transferred)>;

pub fn run(case: &mut Case) -> Result<()> {
    let n = case.scale.pick(150, 1_000);
    let max = case.scale.pick(4 * MIB, 64 * MIB);
    let concurrency = case.scale.pick(8, 16);
    let fx = Fixture::start(Options::ebpf())?;
    let plan = specs(&mut case.rng, n, max);
    // Warm-up: the runtime's worker threads and first allocations belong
    // to the baseline, not to the soak.
    let warmup = specs(&mut case.rng, concurrency, 64 * 1024);
    soak(&fx, &warmup, concurrency)?;
    fx.wait_idle()?;
    let pid = fx.agent.pid();
    let baseline = rss_bytes(pid)?;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(pid).unwrap_or(0), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let started = std::time::Instant::now();
    let done = soak(&fx, &plan, concurrency);
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let done = done?;
    let took = started.elapsed();
    for (spec, local, client) in &done {
        let report = fx
            .upstream
            .ledger
            .wait_for(spec.seed, Duration::from_secs(30))?;
        check_upstream(&report, client).map_err(|e| {
            let audit = fx
                .agent
                .audit_events()
                .unwrap_or_default()
                .into_iter()
                .find(|e| e["event"] == "session_close" && e["source"] == local.to_string());
            e.context(format!("the agent's audit of that session: {audit:?}"))
        })?;
    }
    let copied = check_audit(&fx, &done, warmup.len())?;
    fx.wait_idle()?;
    let after = rss_bytes(pid)?;
    let (up, down) = done
        .iter()
        .fold((0, 0), |(u, d), (s, _, _)| (u + s.up, d + s.down));
    case.figure(
        "sessions",
        format!(
            "{n} sessions, {concurrency} at a time, in {:.1} s: {} up, {} down, sizes 0 B to {}",
            took.as_secs_f64(),
            mib(up),
            mib(down),
            mib(max)
        ),
    );
    case.figure(
        "mix",
        format!(
            "{}; {copied} copied in user space (half-closed before the splice)",
            mix(&done)
        ),
    );
    case.figure(
        "agent RSS",
        format!(
            "baseline {}, peak {}, after {} (tolerance +{})",
            mib(baseline),
            mib(peak.load(Ordering::Relaxed)),
            mib(after),
            mib(RSS_TOLERANCE)
        ),
    );
    ensure!(
        after <= baseline + RSS_TOLERANCE,
        "the agent's RSS did not return to its baseline: {} after, {} before",
        mib(after),
        mib(baseline)
    );
    Ok(())
}

/// Runs `plan` with `concurrency` clients at a time; every session must
/// succeed. Returns each spec with its client address and result.
fn soak(fx: &Fixture, plan: &[Spec], concurrency: usize) -> Result<Done> {
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(plan.len()));
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| {
                while let Some(spec) = plan.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let result = fx.dial().and_then(|stream| {
                        let local = stream.local_addr()?;
                        Ok((local, run_transfer(stream, spec)?))
                    });
                    match result {
                        Ok((local, client)) => done
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((*spec, local, client)),
                        Err(e) => failures
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(format!("{spec:?}: {e:#}")),
                    }
                }
            });
        }
    });
    let failures = failures
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    if !failures.is_empty() {
        for e in fx.agent.audit_events().unwrap_or_default() {
            if e["event"] == "session_close" && !e["detail"].is_null() {
                eprintln!("DEBUG {e}");
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} sessions failed, e.g.:\n{}\n{}",
        failures.len(),
        plan.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        fx.agent.logs_tail(20)
    );
    Ok(done.into_inner().unwrap_or_else(PoisonError::into_inner))
}

/// Every session's close event carries exactly its bytes (the header
/// counts up). Returns how many were copied in user space (a client that
/// half-closed before the splice).
fn check_audit(fx: &Fixture, done: &Done, warmup: usize) -> Result<usize> {
    let closes = fx.wait_audit(
        "session_close",
        warmup + done.len(),
        Duration::from_secs(60),
    )?;
    // Client ports get reused over a thousand sessions: match each session
    // to one unused close event from its address with its exact counts.
    let mut by_source: BTreeMap<String, Vec<&serde_json::Value>> = BTreeMap::new();
    for event in &closes {
        if let Some(source) = event["source"].as_str() {
            by_source.entry(source.to_owned()).or_default().push(event);
        }
    }
    let mut copied = 0;
    for (spec, local, _) in done {
        let events = by_source
            .get_mut(&local.to_string())
            .with_context(|| format!("no session_close from {local}"))?;
        let found = events
            .iter()
            .position(|e| e["bytes_up"] == HEADER_LEN + spec.up && e["bytes_down"] == spec.down);
        let Some(index) = found else {
            anyhow::bail!(
                "{spec:?}: no session_close from {local} counts {} up and {} down: {events:?}",
                HEADER_LEN + spec.up,
                spec.down
            );
        };
        copied += usize::from(events.remove(index)["datapath"] == "userspace");
    }
    Ok(copied)
}

fn mix(done: &Done) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (spec, _, _) in done {
        if let Kind::Transfer {
            order,
            client_early_fin,
            server_early_fin,
        } = spec.kind
        {
            *counts.entry(format!("{order:?}")).or_default() += 1;
            if client_early_fin {
                *counts.entry("client early FIN".into()).or_default() += 1;
            }
            if server_early_fin {
                *counts.entry("server early FIN".into()).or_default() += 1;
            }
        }
    }
    format!("{counts:?}")
}
