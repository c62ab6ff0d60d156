//! The measures, each repeated with the contenders taking turns. Even
//! repetitions go in one order and odd ones in the reverse, so a slow drift
//! of the shared machine affects every contender alike.

use std::time::Instant;

use anyhow::{Context as _, Result};
use tcpgate_tests::preamble;
use tcpgate_tests::topology::TARGET_V4;

use super::auth::{Keys, request_grant};
use super::contender::{self, Contender, Env, Service};
use super::cpu::CpuSpent;
use super::interrupt;
use super::iperf;
use super::latency;
use super::ports;
use super::program_costs::Reading;
use super::results::{Metric, Results};
use super::servers::Shared;
use super::sessions;
use super::settings::{Measure, Settings};
use super::stats::{percentile, sorted};

/// Everything the phases share.
pub struct Bench<'a> {
    pub env: Env<'a>,
    pub settings: &'a Settings,
    pub shared: &'a Shared,
    /// Present when the agent supports `[auth]`.
    pub keys: Option<&'a Keys>,
    pub started: Instant,
}

impl Bench<'_> {
    pub fn progress(&self, line: &str) {
        println!("[{:>5}] {line}", super::took(self.started));
    }
}

/// `items` in order for even repetitions, reversed for odd ones.
pub fn turn_order<T: Copy>(items: &[T], rep: usize) -> Vec<T> {
    let mut order = items.to_vec();
    if rep % 2 == 1 {
        order.reverse();
    }
    order
}

/// Throughput (with CPU) and request/response latency of every contender.
pub fn datapath(bench: &Bench<'_>, results: &mut Results) -> Result<()> {
    let s = bench.settings;
    let (bulk, lat) = (s.wants(Measure::Throughput), s.wants(Measure::Latency));
    if !bulk && !lat {
        return Ok(());
    }
    for rep in 0..s.runs {
        for c in turn_order(&s.contenders, rep) {
            interrupt::check()?;
            let running = contender::start(c, &bench.env)
                .with_context(|| format!("starting {}", c.name()))?;
            let mut line = format!("run {}/{} {:<17}", rep + 1, s.runs, c.name());
            let admin = running.admin_socket().filter(|_| s.bpf_stats);
            if bulk {
                let programs = admin.as_deref().map(Reading::take).transpose()?;
                let mut cpu = (0.0, Some(0.0), 0.0);
                for (streams, metric) in [
                    (1, Metric::ThroughputOneStream),
                    (8, Metric::ThroughputEightStreams),
                ] {
                    let run = iperf::run(
                        bench.env.topo,
                        c.dial(Service::Iperf),
                        streams,
                        s.iperf_seconds,
                        bench.env.work_dir,
                        bench.env.cgroup,
                    )
                    .with_context(|| format!("iperf3 through {}", c.name()))?;
                    results.add(metric, c.name(), run.gbit_per_s);
                    line.push_str(&format!(" {streams}x {:5.2} Gbit/s", run.gbit_per_s));
                    add_cpu(&mut cpu, run.cpu, run.gib());
                }
                results.add(Metric::CpuPerGib, c.name(), cpu.0 / cpu.2);
                line.push_str(&format!(" cpu {:.2} s/GiB", cpu.0 / cpu.2));
                if let Some(attributed) = cpu.1 {
                    results.add(Metric::CpuPerGibAttributed, c.name(), attributed / cpu.2);
                    line.push_str(&format!(" (attributed {:.2})", attributed / cpu.2));
                }
                if let (Some(admin), Some(before)) = (&admin, programs) {
                    let _ =
                        Reading::take(admin)?.record_since(&before, c.name(), results, &mut line);
                }
            }
            if lat {
                let l = latency::ping_pong(
                    &bench.env.topo.runner,
                    c.dial(Service::Echo),
                    s.round_trips,
                )
                .with_context(|| format!("latency through {}", c.name()))?;
                results.add(Metric::LatencyP50, c.name(), l.p50_us);
                results.add(Metric::LatencyP99, c.name(), l.p99_us);
                line.push_str(&format!(
                    " rr p50 {:.0} µs p99 {:.0} µs",
                    l.p50_us, l.p99_us
                ));
            }
            let path = contender::stop_and_check(c, running)?;
            if let Some(warning) = path.warning {
                results.note(format!("unexpected data path: {warning}"));
            }
            if let Some(share) = path.backpressure_share {
                line.push_str(&format!(
                    " ({:.1}% copied under backpressure)",
                    share * 100.0
                ));
            }
            bench.progress(&line);
        }
    }
    Ok(())
}

/// (system CPU s, attributed CPU s, GiB), summed over the bulk runs.
fn add_cpu(total: &mut (f64, Option<f64>, f64), spent: CpuSpent, gib: f64) {
    total.0 += spent.system_seconds;
    total.1 = match (total.1, spent.attributed_seconds) {
        (Some(a), Some(b)) => Some(a + b),
        _ => None,
    };
    total.2 += gib;
}

/// Agent RSS with many idle sessions, on both tcpgate data paths.
pub fn rss(bench: &Bench<'_>, results: &mut Results) -> Result<()> {
    let s = bench.settings;
    if !s.wants(Measure::Rss) {
        return Ok(());
    }
    let paths = [Contender::TcpgateEbpf, Contender::TcpgateUserspace];
    for rep in 0..s.rss_runs {
        for c in turn_order(&paths, rep) {
            interrupt::check()?;
            let datapath = if c == Contender::TcpgateEbpf {
                "ebpf"
            } else {
                "userspace"
            };
            let sections = bench.keys.map(Keys::agent_sections);
            let agent = contender::start_agent(
                &bench.env,
                datapath,
                &contender::agent_config_extra(sections.as_deref()),
            )?;
            let preamble = bench.keys.map(|keys| preamble::encode(&keys.token(3600)));
            let addr = contender::target_bind(ports::IDLE);
            let rss = sessions::idle_rss(
                &bench.env.topo.runner,
                agent.pid(),
                addr,
                preamble,
                s.idle_sessions_measured,
                bench.shared,
            )?;
            let mib = |bytes: f64| bytes / f64::from(1u32 << 20);
            let at_target = rss.extrapolated(s.idle_sessions_measured, s.idle_sessions);
            results.add(Metric::RssIdleSessions, c.name(), mib(at_target));
            bench.progress(&format!(
                "run {}/{} {:<17} RSS {:.1} MiB idle, {:.1} MiB with {} sessions ({:.2} KiB each){}",
                rep + 1,
                s.rss_runs,
                c.name(),
                mib(rss.before as f64),
                mib(rss.with_sessions as f64),
                s.idle_sessions_measured,
                rss.per_session(s.idle_sessions_measured) / 1024.0,
                if s.idle_sessions_measured == s.idle_sessions {
                    String::new()
                } else {
                    format!(", {:.1} MiB at {}", mib(at_target), s.idle_sessions)
                }
            ));
            drop(agent);
        }
    }
    Ok(())
}

/// Teardown latency when a source-bound grant expires (eBPF path).
pub fn teardown(bench: &Bench<'_>, results: &mut Results) -> Result<()> {
    let s = bench.settings;
    if !s.wants(Measure::Teardown) {
        return Ok(());
    }
    let Some(keys) = bench.keys else {
        results.note("teardown latency not measured: this agent has no [auth] support yet");
        return Ok(());
    };
    for rep in 0..s.teardown_runs {
        interrupt::check()?;
        let agent = contender::start_agent(
            &bench.env,
            "ebpf",
            &contender::agent_config_extra(Some(&keys.agent_sections())),
        )?;
        let token = keys.token(3600);
        let lifetime = format!("{}s", s.grant_lifetime_s);
        let grant = bench
            .env
            .topo
            .runner
            .try_run(|| request_grant(&token, ports::TEARDOWN, &lifetime))??;
        let addr = std::net::SocketAddr::from((TARGET_V4, ports::TEARDOWN));
        let latencies = sessions::teardown(
            &bench.env.topo.runner,
            addr,
            &grant,
            s.teardown_sessions,
            bench.shared,
        )?;
        let sorted = sorted(latencies);
        let p50 = percentile(&sorted, 50.0).context("no sessions")?;
        let p99 = percentile(&sorted, 99.0).context("no sessions")?;
        results.add(Metric::TeardownP50, "tcpgate-ebpf", p50);
        results.add(Metric::TeardownP99, "tcpgate-ebpf", p99);
        bench.progress(&format!(
            "run {}/{} teardown of {} sessions (grant {}): p50 {p50:.1} ms p99 {p99:.1} ms max {:.1} ms",
            rep + 1,
            s.teardown_runs,
            s.teardown_sessions,
            grant.id,
            sorted.last().copied().unwrap_or_default()
        ));
        drop(agent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_repetitions_reverse_the_order() {
        assert_eq!(turn_order(&[1, 2, 3], 0), [1, 2, 3]);
        assert_eq!(turn_order(&[1, 2, 3], 1), [3, 2, 1]);
        assert_eq!(turn_order(&[1, 2, 3], 2), [1, 2, 3]);
    }
}
