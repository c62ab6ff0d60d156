//! The goals, evaluated on the medians. They are targets to report
//! against, never assertions: a missed goal is printed, not an error.

use std::fmt;

use super::contender::Contender;
use super::results::{Metric, Results};

/// The limit a figure is held to; each limit is written once, here, and
/// every rendering (terminal, Markdown, JSON, the chart) comes from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    pub fn limit(self) -> f64 {
        match self {
            Target::AtLeast(limit) | Target::AtMost(limit) => limit,
        }
    }

    pub fn met_by(self, value: f64) -> bool {
        match self {
            Target::AtLeast(limit) => value >= limit,
            Target::AtMost(limit) => value <= limit,
        }
    }
}

/// `≥ 1.5`, `≤ 0.5`, `≥ 20,000`.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match self {
            Target::AtLeast(_) => '≥',
            Target::AtMost(_) => '≤',
        };
        let limit = self.limit();
        if limit >= 1000.0 && limit.fract() == 0.0 {
            // Thousands separators: goals are read, not parsed.
            let digits = format!("{limit:.0}");
            let mut grouped = String::new();
            for (i, digit) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    grouped.push(',');
                }
                grouped.push(digit);
            }
            write!(f, "{sign} {grouped}")
        } else {
            write!(f, "{sign} {limit}")
        }
    }
}

/// A goal on a metric's own value (not a ratio), also drawn on the chart.
pub fn absolute_target(metric: Metric) -> Option<Target> {
    match metric {
        Metric::ConnectionsPerSecond => Some(Target::AtLeast(20_000.0)),
        Metric::RssIdleSessions => Some(Target::AtMost(64.0)),
        Metric::TeardownP99 => Some(Target::AtMost(50.0)),
        Metric::RevocationP99 => Some(Target::AtMost(250.0)),
        _ => None,
    }
}

/// What was measured for a goal.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// The figure compared with the target (a ratio or a value).
    pub value: f64,
    /// How the figure reads, with its inputs.
    pub shown: String,
}

#[derive(Debug, Clone)]
pub struct Goal {
    pub name: String,
    pub target: Target,
    /// What the limit is in, written after it: `× HAProxy`, ` ms`.
    pub unit: String,
    /// `None` when the inputs were not measured.
    pub figure: Option<Figure>,
}

impl Goal {
    /// `None` when the inputs were not measured.
    pub fn met(&self) -> Option<bool> {
        self.figure.as_ref().map(|f| self.target.met_by(f.value))
    }

    pub fn verdict(&self) -> &'static str {
        match self.met() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        }
    }

    pub fn shown(&self) -> &str {
        self.figure.as_ref().map_or("not measured", |f| &f.shown)
    }

    /// The target with its unit: `≥ 1.5× HAProxy`, `≤ 50 ms`.
    pub fn target_text(&self) -> String {
        format!("{}{}", self.target, self.unit)
    }
}

fn ratio(results: &Results, metric: Metric, a: Contender, b: Contender) -> Option<(f64, f64, f64)> {
    let x = results.median(metric, a.name())?;
    let y = results.median(metric, b.name())?;
    (y != 0.0).then_some((x / y, x, y))
}

/// A goal on `metric`'s [`absolute_target`], in the metric's unit.
fn absolute(name: String, metric: Metric, figure: Option<Figure>) -> Option<Goal> {
    Some(Goal {
        name,
        target: absolute_target(metric)?,
        unit: format!(" {}", metric.unit()),
        figure,
    })
}

pub fn evaluate(results: &Results) -> Vec<Goal> {
    use Contender::{Direct, Haproxy, TcpgateEbpf};
    let mut goals = Vec::new();
    for (metric, label) in [
        (Metric::ThroughputOneStream, "1 stream"),
        (Metric::ThroughputEightStreams, "8 streams"),
    ] {
        for (other, unit, target) in [
            (Haproxy, "× HAProxy", Target::AtLeast(1.5)),
            (Direct, "× direct", Target::AtLeast(0.8)),
        ] {
            let r = ratio(results, metric, TcpgateEbpf, other);
            goals.push(Goal {
                name: format!("throughput {label}, eBPF vs {}", other.name()),
                target,
                unit: unit.to_owned(),
                figure: r.map(|(q, x, y)| Figure {
                    value: q,
                    shown: format!("{q:.2}× ({x:.2} vs {y:.2} Gbit/s)"),
                }),
            });
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
        goals.push(Goal {
            name: format!("CPU per GiB ({label}), eBPF vs haproxy"),
            target: Target::AtMost(0.5),
            unit: "× HAProxy".to_owned(),
            figure: r.map(|(q, x, y)| Figure {
                value: q,
                shown: format!("{q:.2}× ({x:.3} vs {y:.3} s/GiB)"),
            }),
        });
    }
    for (metric, label) in [(Metric::LatencyP50, "p50"), (Metric::LatencyP99, "p99")] {
        let added = |c: Contender| {
            Some(results.median(metric, c.name())? - results.median(metric, Direct.name())?)
        };
        let r = added(TcpgateEbpf)
            .zip(added(Haproxy))
            .filter(|&(_, h)| h > 0.0);
        goals.push(Goal {
            name: format!("added request/response latency {label}, eBPF vs haproxy"),
            target: Target::AtMost(0.5),
            unit: "× HAProxy's".to_owned(),
            figure: r.map(|(e, h)| Figure {
                value: e / h,
                shown: format!("{:.2}× (+{e:.1} vs +{h:.1} µs over direct)", e / h),
            }),
        });
    }
    for subject in ["preamble", "grant"] {
        let base = results.median(Metric::ConnectionsPerSecond, "no-auth");
        let figure = results
            .median(Metric::ConnectionsPerSecond, subject)
            .map(|v| Figure {
                value: v,
                shown: match base {
                    Some(b) => format!("{v:.0}/s ({:.2}× the no-auth {b:.0}/s)", v / b),
                    None => format!("{v:.0}/s"),
                },
            });
        goals.extend(absolute(
            format!("authenticated connections/s, {subject}"),
            Metric::ConnectionsPerSecond,
            figure,
        ));
    }
    for (metric, name, unit) in [
        (
            Metric::RssIdleSessions,
            "agent RSS at 10,000 idle sessions (eBPF)",
            "MiB",
        ),
        (Metric::TeardownP99, "teardown after grant expiry p99", "ms"),
    ] {
        let figure = results.median(metric, TcpgateEbpf.name()).map(|v| Figure {
            value: v,
            shown: format!("{v:.1} {unit}"),
        });
        goals.extend(absolute(name.to_owned(), metric, figure));
    }
    let figure = results
        .median(Metric::RevocationP99, super::fleet::FLEET)
        .map(|v| Figure {
            value: v,
            shown: format!("{v:.1} ms"),
        });
    goals.extend(absolute(
        "revocation on bastion B until A's 100 sessions are reset, p99".to_owned(),
        Metric::RevocationP99,
        figure,
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
        let find = |name: &str| goals.iter().find(|g| g.name == name).expect(name);
        let vs_haproxy = find("throughput 1 stream, eBPF vs haproxy");
        assert_eq!(
            (
                vs_haproxy.figure.as_ref().map(|f| f.value),
                vs_haproxy.met()
            ),
            (Some(1.8), Some(true))
        );
        assert_eq!(vs_haproxy.target_text(), "≥ 1.5× HAProxy");
        let vs_direct = find("throughput 1 stream, eBPF vs direct");
        assert_eq!(vs_direct.met(), Some(true));
        let added = find("added request/response latency p50, eBPF vs haproxy");
        assert_eq!(
            (added.figure.as_ref().map(|f| f.value), added.met()),
            (Some(0.4), Some(true))
        );
        let teardown = find("teardown after grant expiry p99");
        assert_eq!(
            (teardown.met(), teardown.verdict(), teardown.shown()),
            (Some(false), "MISSED", "70.0 ms")
        );
        assert_eq!(teardown.target_text(), "≤ 50 ms");
        let rss = find("agent RSS at 10,000 idle sessions (eBPF)");
        assert_eq!(
            (rss.met(), rss.verdict(), rss.shown()),
            (None, "-", "not measured")
        );
        let rate = find("authenticated connections/s, grant");
        assert_eq!(rate.target_text(), "≥ 20,000 conn/s");
        let mut r = Results::default();
        r.add(Metric::RevocationP99, super::super::fleet::FLEET, 180.0);
        let goals = evaluate(&r);
        let revocation = goals
            .iter()
            .find(|g| g.name.starts_with("revocation on bastion B"))
            .expect("the revocation goal");
        assert_eq!(
            (
                revocation.met(),
                revocation.shown(),
                revocation.target_text()
            ),
            (Some(true), "180.0 ms", "≤ 250 ms".to_owned())
        );
    }

    #[test]
    fn targets_render_their_limit_once_and_judge_by_it() {
        assert_eq!(Target::AtLeast(1.5).to_string(), "≥ 1.5");
        assert_eq!(Target::AtMost(0.5).to_string(), "≤ 0.5");
        assert_eq!(Target::AtMost(64.0).to_string(), "≤ 64");
        assert_eq!(Target::AtLeast(20_000.0).to_string(), "≥ 20,000");
        assert_eq!(Target::AtLeast(1_250_000.0).to_string(), "≥ 1,250,000");
        assert!(Target::AtLeast(2.0).met_by(2.0) && !Target::AtLeast(2.0).met_by(1.9));
        assert!(Target::AtMost(2.0).met_by(2.0) && !Target::AtMost(2.0).met_by(2.1));
    }

    #[test]
    fn every_goal_is_reported_even_unmeasured() {
        let goals = evaluate(&Results::default());
        // 4 throughput, 2 CPU, 2 latency, 2 connection rates, RSS, teardown,
        // revocation across bastions.
        assert_eq!(goals.len(), 13);
        assert!(goals.iter().all(|g| g.met().is_none()));
    }
}
