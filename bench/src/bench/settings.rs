//! `tcpgate-bench bench` arguments and what they turn into.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::congestion::CongestionControl;
use super::connrate::Load;
use super::contender::Contender;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Fewer and shorter runs: finishes in under 3 minutes.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every measure (default: 3 with --quick, else 5 for the
    /// data path and connection rate, 3 for RSS and teardown).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=50))]
    pub runs: Option<u16>,
    /// Run only these measures (repeat or comma-separate).
    #[arg(long, value_name = "NAME", value_enum, value_delimiter = ',')]
    pub only: Vec<Measure>,
    /// Run the throughput and latency turns with these contenders only
    /// (repeat or comma-separate): an A/B of two paths without the others'
    /// turns in between. The goals then lack the anchors left out.
    #[arg(long, value_name = "NAME", value_enum, value_delimiter = ',')]
    pub contenders: Vec<Contender>,
    /// Where results.json, results.md and chart.svg go.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    pub out: PathBuf,
    /// TCP congestion control in the runner, bastion and target namespaces
    /// (`net.ipv4.tcp_congestion_control`). Fixed so that machines with
    /// other defaults measure the same thing; results.json records the
    /// machine's own default beside it. BBR without the `fq` qdisc made the
    /// bulk figures bimodal on 2-vCPU machines. If the machine's
    /// `net.ipv4.tcp_allowed_congestion_control` lacks NAME (namespaces may
    /// only take an allowed one), it is added for the run and put back.
    #[arg(long, value_name = "NAME", default_value = "cubic")]
    pub congestion_control: CongestionControl,
    /// Spread the receive processing of the bastion's two links over all
    /// CPUs (RPS), as a multi-queue NIC would. veth has no receive-side
    /// scaling, and the sockmap's backlog work runs on the receiving CPU.
    /// Every contender is measured with it; off by default.
    #[arg(long)]
    pub rps: bool,
    /// Turn on the kernel's eBPF run statistics for the run and report
    /// each tcpgate program's time per run (one packet or socket lookup)
    /// in every tcpgate turn, from the agent's /metrics. Counting adds two
    /// clock reads to every run of every eBPF program, so it is off by
    /// default and the other figures of such a run read a little lower.
    #[arg(long)]
    pub bpf_stats: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// iperf3 bulk throughput, 1 and 8 streams, with CPU per GiB.
    Throughput,
    /// 64-byte request/response latency.
    Latency,
    /// New connections per second: plain TCP directly and through HAProxy
    /// (the anchors), and through tcpgate without auth, with a preamble and
    /// with a grant.
    Connrate,
    /// Agent RSS with 10,000 idle sessions.
    Rss,
    /// Teardown latency when a grant expires.
    Teardown,
    /// `tcpgate run --takeover` of an agent holding 1,000 idle and 8
    /// streaming sessions: time to ready, longest stream pause.
    Takeover,
    /// The grant API with and without etcd, and a revocation across
    /// bastions (etcd, two bastions).
    Fleet,
}

/// Every knob of one bench run, recorded in results.json.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub mode: &'static str,
    pub only: Vec<Measure>,
    /// The data-path contenders, in turn order.
    pub contenders: Vec<Contender>,
    /// Repetitions of the data-path and connection-rate measures.
    pub runs: usize,
    pub iperf_seconds: u32,
    pub round_trips: usize,
    #[serde(skip)]
    pub conn_load: Load,
    pub conn_concurrency: usize,
    pub conn_seconds: f64,
    pub rss_runs: usize,
    /// The session count the RSS figure is reported for.
    pub idle_sessions: u32,
    /// How many idle sessions are opened: `idle_sessions` unless the
    /// open-files limit is lower (see `fit_sessions_to_fd_limit`).
    pub idle_sessions_measured: u32,
    pub teardown_runs: usize,
    pub teardown_sessions: u32,
    /// Lifetime of the grant whose expiry ends the sessions.
    pub grant_lifetime_s: u32,
    pub takeover_runs: usize,
    /// Idle sessions the replaced agent holds (plus the streaming ones).
    pub takeover_idle: u32,
    /// Repetitions of the fleet measures.
    pub fleet_runs: usize,
    /// Grants requested one after another for the grant API's latency.
    pub grant_requests: usize,
    /// Runners requesting grants at once, and for how long, for the rate.
    pub grant_workers: usize,
    pub grant_seconds: f64,
    /// Live sessions on bastion A that a revocation on B resets.
    pub revocation_sessions: usize,
    /// Set in every namespace the bench makes (`--congestion-control`).
    pub congestion_control: CongestionControl,
    /// RPS over all CPUs on the bastion's links (`--rps`).
    pub rps: bool,
    /// The kernel's eBPF run statistics on, per-program figures taken.
    pub bpf_stats: bool,
}

impl Settings {
    pub fn from_args(args: &BenchArgs) -> Result<Settings> {
        let quick = args.quick;
        let runs = args.runs.map(usize::from);
        let conn_load = Load {
            concurrency: 64,
            warmup: Duration::from_millis(if quick { 300 } else { 500 }),
            duration: Duration::from_millis(if quick { 1500 } else { 3000 }),
        };
        let mut only = args.only.clone();
        only.sort();
        only.dedup();
        let contenders: Vec<Contender> = Contender::ALL
            .into_iter()
            .filter(|c| args.contenders.is_empty() || args.contenders.contains(c))
            .collect();
        let settings = Settings {
            mode: if quick { "quick" } else { "full" },
            only,
            contenders,
            runs: runs.unwrap_or(if quick { 3 } else { 5 }),
            iperf_seconds: if quick { 1 } else { 4 },
            round_trips: if quick { 2_000 } else { 10_000 },
            conn_load,
            conn_concurrency: conn_load.concurrency,
            conn_seconds: conn_load.duration.as_secs_f64(),
            rss_runs: runs.unwrap_or(if quick { 1 } else { 3 }),
            idle_sessions: 10_000,
            idle_sessions_measured: 10_000,
            teardown_runs: runs.unwrap_or(if quick { 1 } else { 3 }),
            teardown_sessions: 1_000,
            grant_lifetime_s: 4,
            takeover_runs: runs.unwrap_or(if quick { 3 } else { 5 }),
            takeover_idle: 1_000,
            fleet_runs: runs.unwrap_or(if quick { 1 } else { 3 }),
            grant_requests: if quick { 200 } else { 1_000 },
            grant_workers: 8,
            grant_seconds: if quick { 2.0 } else { 5.0 },
            revocation_sessions: 100,
            congestion_control: args.congestion_control.clone(),
            rps: args.rps,
            bpf_stats: args.bpf_stats,
        };
        if settings.runs == 0 {
            bail!("--runs must be at least 1");
        }
        Ok(settings)
    }

    pub fn wants(&self, measure: Measure) -> bool {
        self.only.is_empty() || self.only.contains(&measure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(quick: bool, runs: Option<u16>, only: Vec<Measure>) -> BenchArgs {
        BenchArgs {
            quick,
            runs,
            only,
            contenders: vec![],
            out: PathBuf::from("target/bench"),
            congestion_control: "cubic".parse().expect("valid"),
            rps: false,
            bpf_stats: false,
        }
    }

    #[test]
    fn quick_is_shorter_and_runs_override() {
        let quick = Settings::from_args(&args(true, None, vec![])).expect("valid");
        let full = Settings::from_args(&args(false, None, vec![])).expect("valid");
        assert!(quick.runs < full.runs && quick.iperf_seconds < full.iperf_seconds);
        assert_eq!(full.idle_sessions, 10_000);
        assert_eq!(full.teardown_sessions, 1_000);
        assert!(quick.grant_requests < full.grant_requests && quick.fleet_runs < full.fleet_runs);
        assert_eq!(full.revocation_sessions, 100);
        let two = Settings::from_args(&args(false, Some(2), vec![])).expect("valid");
        assert_eq!((two.runs, two.rss_runs, two.teardown_runs), (2, 2, 2));
    }

    #[test]
    fn only_selects_measures() {
        let s = Settings::from_args(&args(
            true,
            None,
            vec![Measure::Rss, Measure::Latency, Measure::Rss],
        ))
        .expect("valid");
        assert_eq!(s.only, [Measure::Latency, Measure::Rss]);
        assert!(s.wants(Measure::Rss) && !s.wants(Measure::Throughput));
        let all = Settings::from_args(&args(true, None, vec![])).expect("valid");
        assert!(all.wants(Measure::Teardown));
        assert_eq!(all.contenders, Contender::ALL);
    }

    #[test]
    fn contenders_keep_the_turn_order() {
        let mut a = args(true, None, vec![]);
        a.contenders = vec![Contender::TcpgateRouted, Contender::Direct];
        let s = Settings::from_args(&a).expect("valid");
        assert_eq!(s.contenders, [Contender::Direct, Contender::TcpgateRouted]);
    }
}
