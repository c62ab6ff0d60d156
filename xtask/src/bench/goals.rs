//! The goals, evaluated on the medians. They are targets to report
//! against, never assertions: a missed goal is printed, not an error.

use serde::Serialize;

use super::contender::Contender;
use super::results::{Metric, Results};

#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub goal: String,
    /// The figure compared with the target (a ratio or a value).
    pub value: Option<f64>,
    /// How the figure reads, with its inputs.
    pub shown: String,
    pub target: String,
    /// `None` when the inputs were not measured.
    pub met: Option<bool>,
}

impl Goal {
    fn new(
        goal: String,
        value: Option<f64>,
        shown: String,
        target: &str,
        at_least: bool,
        limit: f64,
    ) -> Goal {
        let met = value.map(|v| if at_least { v >= limit } else { v <= limit });
        Goal {
            goal,
            value,
            shown: if value.is_some() {
                shown
            } else {
                "not measured".into()
            },
            target: target.to_owned(),
            met,
        }
    }

    pub fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        }
    }
}

fn ratio(results: &Results, metric: Metric, a: Contender, b: Contender) -> Option<(f64, f64, f64)> {
    let x = results.median(metric, a.name())?;
    let y = results.median(metric, b.name())?;
    (y != 0.0).then_some((x / y, x, y))
}

pub fn evaluate(results: &Results) -> Vec<Goal> {
    use Contender::{Direct, Haproxy, TcpgateEbpf};
    let mut goals = Vec::new();
    for (metric, label) in [
        (Metric::ThroughputOneStream, "1 stream"),
        (Metric::ThroughputEightStreams, "8 streams"),
    ] {
        for (other, target, limit) in [
            (Haproxy, "≥ 1.5× HAProxy", 1.5),
            (Direct, "≥ 0.8× direct", 0.8),
        ] {
            let r = ratio(results, metric, TcpgateEbpf, other);
            goals.push(Goal::new(
                format!("throughput {label}, eBPF vs {}", other.name()),
                r.map(|r| r.0),
                r.map(|(q, x, y)| format!("{q:.2}× ({x:.2} vs {y:.2} Gbit/s)"))
                    .unwrap_or_default(),
                target,
                true,
                limit,
            ));
        }
    }
    for (metric, label) in [
        (Metric::CpuPerGib, "whole machine"),
        (
            Metric::CpuPerGibAttributed,
            "bench processes + kernel threads",
        ),
    ] {
        let r = ratio(results, metric, TcpgateEbpf, Haproxy);
        goals.push(Goal::new(
            format!("CPU per GiB ({label}), eBPF vs haproxy"),
            r.map(|r| r.0),
            r.map(|(q, x, y)| format!("{q:.2}× ({x:.3} vs {y:.3} s/GiB)"))
                .unwrap_or_default(),
            "≤ 0.5× HAProxy",
            false,
            0.5,
        ));
    }
    for (metric, label) in [(Metric::LatencyP50, "p50"), (Metric::LatencyP99, "p99")] {
        let added = |c: Contender| {
            Some(results.median(metric, c.name())? - results.median(metric, Direct.name())?)
        };
        let r = added(TcpgateEbpf)
            .zip(added(Haproxy))
            .filter(|&(_, h)| h > 0.0);
        goals.push(Goal::new(
            format!("added request/response latency {label}, eBPF vs haproxy"),
            r.map(|(e, h)| e / h),
            r.map(|(e, h)| format!("{:.2}× (+{e:.1} vs +{h:.1} µs over direct)", e / h))
                .unwrap_or_default(),
            "≤ 0.5× HAProxy's",
            false,
            0.5,
        ));
    }
    for subject in ["preamble", "grant"] {
        let v = results.median(Metric::ConnectionsPerSecond, subject);
        let base = results.median(Metric::ConnectionsPerSecond, "no-auth");
        goals.push(Goal::new(
            format!("authenticated connections/s, {subject}"),
            v,
            v.map(|v| match base {
                Some(b) => format!("{v:.0}/s ({:.2}× the no-auth {b:.0}/s)", v / b),
                None => format!("{v:.0}/s"),
            })
            .unwrap_or_default(),
            "≥ 20,000/s",
            true,
            20_000.0,
        ));
    }
    let rss = results.median(Metric::RssIdleSessions, TcpgateEbpf.name());
    goals.push(Goal::new(
        "agent RSS at 10,000 idle sessions (eBPF)".into(),
        rss,
        rss.map(|v| format!("{v:.1} MiB")).unwrap_or_default(),
        "≤ 64 MiB",
        false,
        64.0,
    ));
    let p99 = results.median(Metric::TeardownP99, TcpgateEbpf.name());
    goals.push(Goal::new(
        "teardown after grant expiry p99".into(),
        p99,
        p99.map(|v| format!("{v:.1} ms")).unwrap_or_default(),
        "≤ 50 ms",
        false,
        50.0,
    ));
    goals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_verdicts_come_from_medians() {
        let mut r = Results::default();
        for (c, v) in [("direct", 10.0), ("tcpgate-ebpf", 9.0), ("haproxy", 5.0)] {
            r.add(Metric::ThroughputOneStream, c, v);
        }
        for (c, v) in [
            ("direct", 100.0),
            ("tcpgate-ebpf", 120.0),
            ("haproxy", 150.0),
        ] {
            r.add(Metric::LatencyP50, c, v);
        }
        r.add(Metric::TeardownP99, "tcpgate-ebpf", 70.0);
        let goals = evaluate(&r);
        let find = |name: &str| goals.iter().find(|g| g.goal == name).expect(name);
        let vs_haproxy = find("throughput 1 stream, eBPF vs haproxy");
        assert_eq!((vs_haproxy.value, vs_haproxy.met), (Some(1.8), Some(true)));
        let vs_direct = find("throughput 1 stream, eBPF vs direct");
        assert_eq!(vs_direct.met, Some(true));
        let added = find("added request/response latency p50, eBPF vs haproxy");
        assert_eq!((added.value, added.met), (Some(0.4), Some(true)));
        assert_eq!(find("teardown after grant expiry p99").met, Some(false));
        let rss = find("agent RSS at 10,000 idle sessions (eBPF)");
        assert_eq!((rss.met, rss.shown.as_str()), (None, "not measured"));
    }
}
