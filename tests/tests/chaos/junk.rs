//! Case 1: a junk flood while legitimate sessions stream.
//!
//! Rounds alternate: A (undisturbed) and B (the flood runs throughout),
//! each moving the same bytes through two fresh authenticated sessions,
//! one upload and one download, verified by SHA-256 at both ends. The throughput ratio is
//! median(B) / median(A) over the pairs, so load from elsewhere on a shared
//! machine hits both sides alike. The ratio is printed on every run and
//! asserted (>= 0.9) only in the full run: CI machines are too noisy for a
//! timing assertion. Every legitimate session must succeed, always.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rand::Rng as _;

use super::client::{check_upstream, run_transfer};
use super::fixture::{Fixture, Options, denial_reasons, denied_metrics, service};
use super::flood::{self, Flood, Junk};
use super::mode::{Case, mib, ms};
use super::wire::{Order, Spec};

const MIB: u64 = 1024 * 1024;
/// Legitimate sessions per round: uploads and downloads in turn.
const SESSIONS_PER_ROUND: usize = 2;
/// At least this many A/B pairs, whatever the junk count.
const MIN_PAIRS: usize = 3;
/// Junk connections per second while the flood runs.
const RATE: u32 = 500;

pub fn run(case: &mut Case) -> Result<()> {
    let target = case.scale.pick(1_500, 10_000);
    let bytes = case.scale.pick(32 * MIB, 128 * MIB);
    // A bound on the loop, far above what the junk target needs.
    let max_pairs = case.scale.pick(60, 150);
    let fx = Fixture::start(Options::ebpf().with_auth())?;
    let flood = Flood::new(
        &fx.topo.runner,
        service(),
        RATE,
        4,
        case.rng.random(),
        Duration::from_secs(15),
    )?;
    case.figure(
        "plan",
        format!(
            "{target} junk connections at {RATE}/s; rounds of {SESSIONS_PER_ROUND} sessions (upload, download) of {} each",
            mib(bytes)
        ),
    );
    let mut undisturbed = Vec::new();
    let mut disturbed = Vec::new();
    let mut sessions = 0u64;
    // The agent's CPU time in each kind of round, to see what junk costs it.
    let (mut cpu_a, mut cpu_b) = (Duration::ZERO, Duration::ZERO);
    // And this process's (the legitimate clients, the upstream, the flood):
    // the flood's own cost is an artefact of generating it on this machine.
    let (mut own_a, mut own_b) = (Duration::ZERO, Duration::ZERO);
    let (pid, me) = (fx.agent.pid(), std::process::id());
    while disturbed.len() < MIN_PAIRS || flood.sent() < target {
        ensure!(
            disturbed.len() < max_pairs,
            "{max_pairs} rounds made only {} of {target} junk connections",
            flood.sent()
        );
        let (before, own_before) = (cpu_time(pid)?, cpu_time(me)?);
        undisturbed.push(round(&fx, case, bytes, &mut sessions).context("undisturbed round")?);
        let (between, own_between) = (cpu_time(pid)?, cpu_time(me)?);
        flood.resume();
        let result = round(&fx, case, bytes, &mut sessions);
        flood.pause();
        disturbed.push(result.context("round under the junk flood")?);
        quiesce(&fx, &flood)?;
        cpu_a += between - before;
        cpu_b += cpu_time(pid)? - between;
        own_a += own_between - own_before;
        own_b += cpu_time(me)? - own_between;
    }
    let report = flood.finish()?;
    let ratio = median(&disturbed) / median(&undisturbed);
    let pair_ratios: Vec<f64> = disturbed
        .iter()
        .zip(&undisturbed)
        .map(|(b, a)| b / a)
        .collect();
    case.figure(
        "throughput",
        format!(
            "undisturbed {:.0} MB/s, under junk {:.0} MB/s (medians of {} pairs); ratio {ratio:.3} (per-pair median {:.3})",
            median(&undisturbed) / 1e6,
            median(&disturbed) / 1e6,
            disturbed.len(),
            median(&pair_ratios)
        ),
    );
    case.figure(
        "junk sent",
        format!("{} in all: {:?}", report.total(), report.sent),
    );
    case.figure(
        "agent CPU",
        format!(
            "{} in undisturbed rounds, {} in disturbed ones (refusals included): about {:.0} µs per junk connection",
            ms(cpu_a),
            ms(cpu_b),
            cpu_b.saturating_sub(cpu_a).as_secs_f64() * 1e6 / report.total().max(1) as f64
        ),
    );
    case.figure(
        "test process CPU",
        format!(
            "{} in undisturbed rounds, {} in disturbed ones: about {:.0} µs per junk connection made",
            ms(own_a),
            ms(own_b),
            own_b.saturating_sub(own_a).as_secs_f64() * 1e6 / report.total().max(1) as f64
        ),
    );
    flood::check(&report)?;
    let mut holds = report.cut.clone();
    holds.sort();
    if let (Some(first), Some(last)) = (holds.first(), holds.last()) {
        case.figure(
            "slowloris",
            format!(
                "{} held until the agent cut them after {} to {} (median {})",
                holds.len(),
                ms(*first),
                ms(*last),
                ms(holds[holds.len() / 2])
            ),
        );
    }
    ensure!(
        report.total() >= target,
        "only {} junk connections",
        report.total()
    );
    check_refusals(case, &fx, &report, sessions)?;
    if case.scale.is_full() {
        ensure!(
            ratio >= 0.9,
            "legitimate throughput under the junk flood fell to {ratio:.3} of undisturbed"
        );
    }
    fx.wait_idle()
}

/// One round: `SESSIONS_PER_ROUND` sessions moving `bytes` each, at once;
/// returns the payload throughput in bytes per second.
fn round(fx: &Fixture, case: &mut Case, bytes: u64, sessions: &mut u64) -> Result<f64> {
    let specs: Vec<Spec> = (0..SESSIONS_PER_ROUND)
        .map(|i| {
            // One upload and one download.
            let (up, down, order) = if i % 2 == 0 {
                (bytes, 0, Order::ClientFirst)
            } else {
                (0, bytes, Order::ServerFirst)
            };
            Spec::transfer(case.rng.random(), up, down, order)
        })
        .collect();
    let started = Instant::now();
    let results: Vec<Result<_>> = std::thread::scope(|scope| {
        let running: Vec<_> = specs
            .iter()
            .map(|spec| scope.spawn(move || run_transfer(fx.dial()?, spec)))
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect()
    });
    let took = started.elapsed();
    for (spec, result) in specs.iter().zip(results) {
        let client = result
            .with_context(|| format!("legitimate session failed\n{}", fx.agent.logs_tail(15)))?;
        let report = fx
            .upstream
            .ledger
            .wait_for(spec.seed, Duration::from_secs(20))?;
        check_upstream(&report, &client)?;
        *sessions += 1;
    }
    Ok((bytes * SESSIONS_PER_ROUND as u64) as f64 / took.as_secs_f64())
}

/// Waits (bounded) until the agent has refused every junk connection made
/// so far, except the slowloris ones still held: the next undisturbed
/// round must not run on the flood's backlog.
fn quiesce(fx: &Fixture, flood: &Flood) -> Result<()> {
    let (mut denied, mut expected) = (0, 0);
    tcpgate_tests::eventually(
        Duration::from_secs(20),
        "every junk connection refused",
        || -> Result<bool> {
            denied = denied_metrics(&fx.metrics()?).values().sum::<usize>() as u64;
            expected = flood.sent() - flood.holding();
            Ok(denied >= expected)
        },
    )
    .with_context(|| format!("the agent refused {denied} of {expected} junk connections"))
}

/// Every junk connection was refused for the reason its kind implies, in
/// the audit and in the metrics, and none reached the upstream.
fn check_refusals(
    case: &Case,
    fx: &Fixture,
    report: &flood::FloodReport,
    sessions: u64,
) -> Result<()> {
    let total = usize::try_from(report.total())?;
    // A client sees its refusal before the agent's audit line is written.
    fx.wait_audit("connection_denied", total, Duration::from_secs(30))?;
    let events = fx.agent.audit_events()?;
    let denied = denial_reasons(&events);
    case.figure("refused by reason", format!("{denied:?}"));
    let audited: usize = denied.values().sum();
    ensure!(
        audited == total,
        "{audited} connection_denied audit events for {total} junk connections: {denied:?}"
    );
    let count = |reason: &str| denied.get(reason).copied().unwrap_or(0) as u64;
    ensure!(
        count("bad_magic") == report.of(Junk::RandomBytes),
        "random bytes: {} sent, {} refused as bad_magic ({denied:?})",
        report.of(Junk::RandomBytes),
        count("bad_magic")
    );
    ensure!(
        count("timeout") == report.of(Junk::Slowloris),
        "slowloris: {} sent, {} cut at the preamble deadline ({denied:?})",
        report.of(Junk::Slowloris),
        count("timeout")
    );
    // A reset may reach the agent as an error or, when it lands before
    // the first read, as an empty stream: truncated after 0 bytes.
    ensure!(
        count("truncated") + count("io_error")
            == report.of(Junk::Truncated) + report.of(Junk::ResetAfterSyn)
            && count("truncated") >= report.of(Junk::Truncated),
        "truncated {} and reset {} sent; refused: {denied:?}",
        report.of(Junk::Truncated),
        report.of(Junk::ResetAfterSyn)
    );
    let metrics = denied_metrics(&fx.metrics()?);
    ensure!(
        metrics == denied,
        "metrics by reason {metrics:?} differ from the audit {denied:?}"
    );
    let opened = events
        .iter()
        .filter(|e| e["event"] == "session_open")
        .count() as u64;
    ensure!(
        opened == sessions,
        "{opened} sessions opened for {sessions} legitimate ones"
    );
    let foreign = fx.upstream.ledger.foreign();
    ensure!(
        foreign.is_empty() && fx.upstream.ledger.connections() == sessions,
        "junk reached the upstream: {} connections for {sessions} sessions, foreign: {:?}",
        fx.upstream.ledger.connections(),
        foreign.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

/// User and system CPU time of a process so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ")".
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc/pid/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
    }
}
