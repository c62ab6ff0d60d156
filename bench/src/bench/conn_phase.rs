//! The connection-rate measure: plain TCP directly and through HAProxy
//! (the anchors), the no-auth baselines, per-connection preambles and a
//! source-bound grant on one authenticating agent (eBPF path), and a
//! source grant on an agent with routed grants (the SYN decided by the tc
//! program, the flow forwarded).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use tcpgate_tests::agent::Agent;
use tcpgate_tests::preamble;

use super::auth::request_grant;
use super::connrate;
use super::contender::{self, Contender, Service};
use super::cpu;
use super::interrupt;
use super::phases::{Bench, turn_order};
use super::ports;
use super::program_costs::Reading;
use super::results::{Metric, Results};
use super::routed;
use super::settings::Measure;

/// The subject of connections a routed source grant admits.
pub const GRANT_ROUTED: &str = "grant-routed";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnTurn {
    /// Plain TCP connects to the target, the bastion only routing: the
    /// limit.
    Direct,
    /// Plain TCP connects through HAProxy on the bastion: the anchor of
    /// the connection-rate goals.
    Haproxy,
    /// No `[auth]`: every connection admitted (eBPF path).
    NoAuth,
    /// No `[auth]`, user-space copy: what a connection costs without the
    /// sockmap setup and teardown.
    NoAuthUserspace,
    /// `[auth]`: per-connection preambles, then a source-bound grant.
    Authenticated,
    /// As `Authenticated`, with `agent.splice_after_bytes` (subjects
    /// `preamble-copy-first`, `grant-copy-first`): each connection's first
    /// bytes copied by the agent, the splice only for longer sessions.
    AuthenticatedCopyFirst,
    /// `[auth]` with routed grants: the runner's source grant routes its
    /// flows (subject `grant-routed`).
    Routed,
}

/// Connection rate: plain TCP directly and through HAProxy, the no-auth
/// baselines, then per-connection preambles and a source-bound grant on
/// one authenticating agent (eBPF path).
pub fn connrate(bench: &Bench<'_>, results: &mut Results) -> Result<()> {
    let s = bench.settings;
    if !s.wants(Measure::Connrate) {
        return Ok(());
    }
    let mut turns = vec![
        ConnTurn::Direct,
        ConnTurn::Haproxy,
        ConnTurn::NoAuth,
        ConnTurn::NoAuthUserspace,
    ];
    if bench.keys.is_some() {
        turns.push(ConnTurn::Authenticated);
        turns.push(ConnTurn::AuthenticatedCopyFirst);
        turns.push(ConnTurn::Routed);
    }
    for rep in 0..s.runs {
        for turn in turn_order(&turns, rep) {
            interrupt::check()?;
            let mut line = format!("run {}/{} connections/s", rep + 1, s.runs);
            let events = conn_turn(bench, turn, results, &mut line)?;
            for (end, count) in contender::abnormal_ends(&events) {
                results.note(format!("{count} session(s) ended abnormally: {end}"));
            }
            bench.progress(&line);
        }
    }
    Ok(())
}

/// One turn of the connection-rate measure; returns the agent's audit
/// events (none for the contenders without an agent).
fn conn_turn(
    bench: &Bench<'_>,
    turn: ConnTurn,
    results: &mut Results,
    line: &mut String,
) -> Result<Vec<serde_json::Value>> {
    match (turn, bench.keys) {
        (ConnTurn::Direct | ConnTurn::Haproxy, _) => {
            let c = if turn == ConnTurn::Direct {
                Contender::Direct
            } else {
                Contender::Haproxy
            };
            let running = contender::start(c, &bench.env)
                .with_context(|| format!("starting {}", c.name()))?;
            let addr = c.dial(Service::Connect);
            let proxy = Proxy::processes(running.pids());
            rate_of(bench, &proxy, c.name(), addr, None, results, line)?;
            Ok(Vec::new())
        }
        (ConnTurn::Authenticated, Some(keys)) => authenticated(bench, keys, None, results, line),
        (ConnTurn::AuthenticatedCopyFirst, Some(keys)) => {
            authenticated(bench, keys, Some(COPY_FIRST), results, line)
        }
        (ConnTurn::Routed, Some(_)) => {
            let agent = routed::start_for(&bench.env, &[ports::CONN_ROUTED], routed::CONN_SECTION)?;
            let addr = contender::target_bind(ports::CONN_ROUTED);
            rate_of(
                bench,
                &Proxy::agent(&agent),
                GRANT_ROUTED,
                addr,
                None,
                results,
                line,
            )?;
            contender::stop_agent(agent)
        }
        (turn, _) => {
            let (datapath, subject) = if turn == ConnTurn::NoAuthUserspace {
                ("userspace", "no-auth-userspace")
            } else {
                ("ebpf", "no-auth")
            };
            let agent =
                contender::start_agent(&bench.env, datapath, &contender::agent_config_extra(None))?;
            let addr = contender::target_bind(ports::CONN_PREAMBLE);
            let proxy = Proxy::agent(&agent);
            rate_of(bench, &proxy, subject, addr, None, results, line)?;
            contender::stop_agent(agent)
        }
    }
}

/// `agent.splice_after_bytes` of the copy-first subjects: a connection
/// cycle's few bytes stay within it, a bulk transfer leaves it at once.
const COPY_FIRST: u64 = 64 << 10;

/// Preambles, then a source-bound grant, on one authenticating agent (eBPF
/// path), which copies each session's first `copy_first` bytes itself when
/// given (subjects suffixed `-copy-first`).
fn authenticated(
    bench: &Bench<'_>,
    keys: &super::auth::Keys,
    copy_first: Option<u64>,
    results: &mut Results,
    line: &mut String,
) -> Result<Vec<serde_json::Value>> {
    let (tuning, suffix) = match copy_first {
        Some(bytes) => (format!("splice_after_bytes = {bytes}"), "-copy-first"),
        None => (String::new(), ""),
    };
    let sections = keys.agent_sections();
    let agent = contender::start_agent_tuned(
        &bench.env,
        "ebpf",
        &tuning,
        &contender::agent_config_extra(Some(&sections)),
    )?;
    let proxy = Proxy::agent(&agent);
    let token = keys.token(3600);
    let preamble = preamble::encode(&token);
    let addr = contender::target_bind(ports::CONN_PREAMBLE);
    let subject = format!("preamble{suffix}");
    rate_of(bench, &proxy, &subject, addr, Some(preamble), results, line)?;
    let runner = &bench.env.topo.runner;
    runner.try_run(|| request_grant(&token, ports::CONN_GRANT, "10m"))??;
    let addr = contender::target_bind(ports::CONN_GRANT);
    rate_of(
        bench,
        &proxy,
        &format!("grant{suffix}"),
        addr,
        None,
        results,
        line,
    )?;
    contender::stop_agent(agent)
}

/// CPU seconds the processes `pids` have used so far.
fn cpu_of(pids: &[u32]) -> Result<f64> {
    pids.iter()
        .map(|&pid| contender::process_cpu_seconds(pid))
        .sum()
}

/// The processes doing a turn's proxying (the agent, HAProxy; none for
/// direct), and the agent's operator socket.
struct Proxy {
    pids: Vec<u32>,
    admin: Option<PathBuf>,
}

impl Proxy {
    fn processes(pids: Vec<u32>) -> Self {
        Self { pids, admin: None }
    }

    fn agent(agent: &Agent) -> Self {
        Self {
            pids: vec![agent.pid()],
            admin: Some(contender::admin_socket(agent)),
        }
    }
}

/// One connection-rate measure, with the CPU per connection of the
/// proxy's processes, and with `--bpf-stats` its programs' time per run.
fn rate_of(
    bench: &Bench<'_>,
    proxy: &Proxy,
    subject: &str,
    addr: std::net::SocketAddr,
    preamble: Option<Vec<u8>>,
    results: &mut Results,
    line: &mut String,
) -> Result<()> {
    let pids = &proxy.pids;
    let admin = proxy.admin.as_deref().filter(|_| bench.settings.bpf_stats);
    let programs = admin.map(Reading::take).transpose()?;
    let cpu_before = cpu_of(pids)?;
    // The load generator and the target's servers are this process's
    // threads; the proxy is in the cgroup.
    let own_before = contender::process_cpu_seconds(std::process::id())?;
    let machine_before = cpu::mark(bench.env.cgroup)?;
    let rate = connrate::measure(
        &bench.env.topo.runner,
        addr,
        preamble,
        bench.settings.conn_load,
    )
    .with_context(|| format!("connection rate, {subject}"))?;
    let cpu = cpu_of(pids)? - cpu_before;
    let machine = cpu::since(&machine_before, bench.env.cgroup)?;
    let own = contender::process_cpu_seconds(std::process::id())? - own_before;
    let programs_after = admin.map(Reading::take).transpose()?;
    results.add(Metric::ConnectionsPerSecond, subject, rate.per_second);
    line.push_str(&format!(" {subject} {:.0}", rate.per_second));
    // The whole cycle's cost: the load generator, the target, the proxy
    // and the kernel threads (softirqs mostly run inside the syscalls of
    // the first three). Less sensitive to other load on a shared machine
    // than the rate itself.
    if let Some(seconds) = machine.attributed_seconds {
        let per_cycle_us = (seconds + own) * 1e6 / rate.cycles_started.max(1) as f64;
        results.add(Metric::CpuPerConnectionAttributed, subject, per_cycle_us);
    }
    if !pids.is_empty() {
        let cpu_us = cpu * 1e6 / rate.cycles_started.max(1) as f64;
        results.add(Metric::AgentCpuPerConnection, subject, cpu_us);
        line.push_str(&format!(" ({cpu_us:.0} µs CPU)"));
    }
    if let (Some(after), Some(before)) = (programs_after, &programs) {
        let seconds = after.record_since(before, subject, results, line);
        let per_cycle_us = seconds * 1e6 / rate.cycles_started.max(1) as f64;
        results.add(Metric::EbpfCpuPerConnection, subject, per_cycle_us);
    }
    if rate.failed > 0 {
        results.note(format!(
            "{subject}: {} of {} connection cycles failed; first error: {}",
            rate.failed,
            rate.failed + rate.completed,
            rate.first_error.as_deref().unwrap_or("?")
        ));
    }
    Ok(())
}
