//! Issue 17's goals, evaluated on the medians. They are targets to report
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

/// tcpgate's data paths; a goal on "tcpgate's fastest path" takes the best
/// of them, and says which one it was.
const TCPGATE_PATHS: [Contender; 2] = [Contender::TcpgateEbpf, Contender::TcpgateUserspace];

/// The best tcpgate path's median for `metric` (highest or lowest, as the
/// metric prefers), with the path's label.
fn best_path(results: &Results, metric: Metric) -> Option<(f64, &'static str)> {
    let medians = TCPGATE_PATHS
        .iter()
        .filter_map(|c| Some((results.median(metric, c.name())?, path_label(*c))));
    if metric.higher_is_better() {
        medians.max_by(|a, b| a.0.total_cmp(&b.0))
    } else {
        medians.min_by(|a, b| a.0.total_cmp(&b.0))
    }
}

fn path_label(c: Contender) -> &'static str {
    match c {
        Contender::TcpgateUserspace => "user space",
        _ => "eBPF",
    }
}

/// `best / reference` with both medians, when both were measured.
fn ratio_to(
    results: &Results,
    metric: Metric,
    best: Option<(f64, &str)>,
    reference: &str,
) -> Option<(f64, f64, f64)> {
    let (x, _) = best?;
    let y = results.median(metric, reference)?;
    (y != 0.0).then_some((x / y, x, y))
}

/// Throughput, 1 and 8 streams, of tcpgate's fastest path against direct.
fn throughput_goals(results: &Results, goals: &mut Vec<Goal>) {
    for (metric, label) in [
        (Metric::ThroughputOneStream, "1 stream"),
        (Metric::ThroughputEightStreams, "8 streams"),
    ] {
        let best = best_path(results, metric);
        let r = ratio_to(results, metric, best, Contender::Direct.name());
        goals.push(Goal {
            name: format!("throughput {label}, tcpgate's fastest path vs direct"),
            target: Target::AtLeast(0.9),
            unit: "× direct".to_owned(),
            figure: r.zip(best).map(|((q, x, y), (_, path))| Figure {
                value: q,
                shown: format!("{q:.2}× ({path} {x:.2} vs {y:.2} Gbit/s)"),
            }),
        });
    }
}

/// CPU per GiB (bench processes + kernel threads) against direct.
fn cpu_goal(results: &Results) -> Goal {
    let metric = Metric::CpuPerGibAttributed;
    let best = best_path(results, metric);
    let r = ratio_to(results, metric, best, Contender::Direct.name());
    Goal {
        name: "CPU per GiB (bench processes + kernel threads) vs direct".to_owned(),
        target: Target::AtMost(1.2),
        unit: "× direct".to_owned(),
        figure: r.zip(best).map(|((q, x, y), (_, path))| Figure {
            value: q,
            shown: format!("{q:.2}× ({path} {x:.3} vs {y:.3} s/GiB)"),
        }),
    }
}

/// Latency added over direct, p50 and p99, against HAProxy's.
fn latency_goals(results: &Results, goals: &mut Vec<Goal>) {
    for (metric, label) in [(Metric::LatencyP50, "p50"), (Metric::LatencyP99, "p99")] {
        let direct = results.median(metric, Contender::Direct.name());
        let best = best_path(results, metric);
        let haproxy = results.median(metric, Contender::Haproxy.name());
        let r = best
            .zip(haproxy)
            .zip(direct)
            .map(|(((x, path), h), d)| (x - d, h - d, path))
            .filter(|&(_, h, _)| h > 0.0);
        goals.push(Goal {
            name: format!("added request/response latency {label}, tcpgate vs haproxy"),
            target: Target::AtMost(0.5),
            unit: "× HAProxy's".to_owned(),
            figure: r.map(|(e, h, path)| Figure {
                value: e / h,
                shown: format!("{:.2}× ({path} +{e:.1} vs +{h:.1} µs over direct)", e / h),
            }),
        });
    }
}

/// Authenticated connection rates against HAProxy's plain TCP rate.
fn connection_goals(results: &Results, goals: &mut Vec<Goal>) {
    let metric = Metric::ConnectionsPerSecond;
    let haproxy = results.median(metric, Contender::Haproxy.name());
    for (subject, limit) in [("preamble", 1.0), ("grant", 1.5)] {
        let figure = results
            .median(metric, subject)
            .zip(haproxy)
            .filter(|&(_, h)| h > 0.0)
            .map(|(v, h)| Figure {
                value: v / h,
                shown: format!("{:.2}× ({v:.0} vs {h:.0}/s)", v / h),
            });
        goals.push(Goal {
            name: format!("new connections/s, {subject}, vs HAProxy plain TCP"),
            target: Target::AtLeast(limit),
            unit: "× HAProxy".to_owned(),
            figure,
        });
    }
}

/// A goal on `metric`'s [`absolute_target`], in the metric's unit.
fn absolute(name: &str, metric: Metric, results: &Results) -> Option<Goal> {
    absolute_of(name, metric, Contender::TcpgateEbpf.name(), results)
}

/// [`absolute`] for the figure `contender` measured.
fn absolute_of(name: &str, metric: Metric, contender: &str, results: &Results) -> Option<Goal> {
    let unit = metric.unit();
    let figure = results.median(metric, contender).map(|v| Figure {
        value: v,
        shown: format!("{v:.1} {unit}"),
    });
    Some(Goal {
        name: name.to_owned(),
        target: absolute_target(metric)?,
        unit: format!(" {unit}"),
        figure,
    })
}

/// Issue 17's goals, in its table's order.
pub fn evaluate(results: &Results) -> Vec<Goal> {
    let mut goals = Vec::new();
    throughput_goals(results, &mut goals);
    goals.push(cpu_goal(results));
    latency_goals(results, &mut goals);
    connection_goals(results, &mut goals);
    goals.extend(absolute(
        "agent RSS at 10,000 idle sessions (eBPF)",
        Metric::RssIdleSessions,
        results,
    ));
    goals.extend(absolute(
        "teardown after grant expiry p99",
        Metric::TeardownP99,
        results,
    ));
    goals.extend(absolute_of(
        "revocation on bastion B until A's 100 sessions are reset, p99",
        Metric::RevocationP99,
        super::fleet::FLEET,
        results,
    ));
    goals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(goals: &'a [Goal], name: &str) -> &'a Goal {
        goals.iter().find(|g| g.name == name).expect(name)
    }

    fn value(goal: &Goal) -> Option<f64> {
        goal.figure.as_ref().map(|f| f.value)
    }

    #[test]
    fn throughput_takes_tcpgates_fastest_path_against_direct() {
        let mut r = Results::default();
        for (c, v) in [
            ("direct", 10.0),
            ("tcpgate-ebpf", 8.0),
            ("tcpgate-userspace", 9.5),
            ("haproxy", 5.0),
        ] {
            r.add(Metric::ThroughputOneStream, c, v);
        }
        for (c, v) in [("direct", 20.0), ("tcpgate-ebpf", 17.0)] {
            r.add(Metric::ThroughputEightStreams, c, v);
        }
        let goals = evaluate(&r);
        let one = find(
            &goals,
            "throughput 1 stream, tcpgate's fastest path vs direct",
        );
        assert_eq!((value(one), one.met()), (Some(0.95), Some(true)));
        assert_eq!(one.shown(), "0.95× (user space 9.50 vs 10.00 Gbit/s)");
        assert_eq!(one.target_text(), "≥ 0.9× direct");
        let eight = find(
            &goals,
            "throughput 8 streams, tcpgate's fastest path vs direct",
        );
        assert_eq!((value(eight), eight.met()), (Some(0.85), Some(false)));
        assert_eq!(eight.verdict(), "MISSED");
    }

    #[test]
    fn cpu_per_gib_takes_the_cheapest_path_against_direct() {
        let mut r = Results::default();
        for (c, v) in [
            ("direct", 0.5),
            ("tcpgate-ebpf", 0.55),
            ("tcpgate-userspace", 0.7),
        ] {
            r.add(Metric::CpuPerGibAttributed, c, v);
        }
        // The whole-machine figure is not a goal any more.
        r.add(Metric::CpuPerGib, "tcpgate-ebpf", 99.0);
        let goals = evaluate(&r);
        let cpu = find(
            &goals,
            "CPU per GiB (bench processes + kernel threads) vs direct",
        );
        assert_eq!(cpu.met(), Some(true));
        assert_eq!(cpu.shown(), "1.10× (eBPF 0.550 vs 0.500 s/GiB)");
        assert_eq!(cpu.target_text(), "≤ 1.2× direct");
        r.add(Metric::CpuPerGibAttributed, "tcpgate-ebpf", 0.65);
        r.add(Metric::CpuPerGibAttributed, "tcpgate-ebpf", 0.65);
        let goals = evaluate(&r);
        let cpu = find(
            &goals,
            "CPU per GiB (bench processes + kernel threads) vs direct",
        );
        assert_eq!(cpu.met(), Some(false));
    }

    #[test]
    fn added_latency_is_over_direct_against_haproxys() {
        let mut r = Results::default();
        for (c, v) in [
            ("direct", 100.0),
            ("tcpgate-ebpf", 120.0),
            ("haproxy", 150.0),
        ] {
            r.add(Metric::LatencyP50, c, v);
        }
        for (c, v) in [
            ("direct", 100.0),
            ("tcpgate-ebpf", 140.0),
            ("haproxy", 150.0),
        ] {
            r.add(Metric::LatencyP99, c, v);
        }
        let goals = evaluate(&r);
        let p50 = find(
            &goals,
            "added request/response latency p50, tcpgate vs haproxy",
        );
        assert_eq!((value(p50), p50.met()), (Some(0.4), Some(true)));
        let p99 = find(
            &goals,
            "added request/response latency p99, tcpgate vs haproxy",
        );
        assert_eq!((value(p99), p99.met()), (Some(0.8), Some(false)));
    }

    #[test]
    fn connection_rates_are_anchored_on_haproxys_plain_tcp_rate() {
        let mut r = Results::default();
        for (c, v) in [
            ("direct", 20_000.0),
            ("haproxy", 8_000.0),
            ("no-auth", 6_000.0),
            ("preamble", 8_000.0),
            ("grant", 11_000.0),
        ] {
            r.add(Metric::ConnectionsPerSecond, c, v);
        }
        let goals = evaluate(&r);
        let preamble = find(&goals, "new connections/s, preamble, vs HAProxy plain TCP");
        assert_eq!((value(preamble), preamble.met()), (Some(1.0), Some(true)));
        assert_eq!(preamble.target_text(), "≥ 1× HAProxy");
        let grant = find(&goals, "new connections/s, grant, vs HAProxy plain TCP");
        assert_eq!(grant.met(), Some(false), "11,000 < 1.5 × 8,000");
        assert_eq!(grant.shown(), "1.38× (11000 vs 8000/s)");
        assert_eq!(grant.target_text(), "≥ 1.5× HAProxy");
        // Without the anchor there is no verdict, whatever the rate.
        let mut unanchored = Results::default();
        unanchored.add(Metric::ConnectionsPerSecond, "grant", 50_000.0);
        let goals = evaluate(&unanchored);
        let grant = find(&goals, "new connections/s, grant, vs HAProxy plain TCP");
        assert_eq!((grant.met(), grant.shown()), (None, "not measured"));
    }

    #[test]
    fn memory_and_teardown_are_absolute() {
        let mut r = Results::default();
        r.add(Metric::TeardownP99, "tcpgate-ebpf", 70.0);
        let goals = evaluate(&r);
        let teardown = find(&goals, "teardown after grant expiry p99");
        assert_eq!(
            (teardown.met(), teardown.verdict(), teardown.shown()),
            (Some(false), "MISSED", "70.0 ms")
        );
        assert_eq!(teardown.target_text(), "≤ 50 ms");
        let rss = find(&goals, "agent RSS at 10,000 idle sessions (eBPF)");
        assert_eq!(
            (rss.met(), rss.verdict(), rss.shown()),
            (None, "-", "not measured")
        );
        assert_eq!(rss.target_text(), "≤ 64 MiB");
        assert_eq!(absolute_target(Metric::ConnectionsPerSecond), None);
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
    fn every_goal_of_the_issue_is_reported_even_unmeasured() {
        let goals = evaluate(&Results::default());
        // 2 throughput, CPU, 2 latency, 2 connection rates, RSS, teardown,
        // revocation across bastions.
        assert_eq!(goals.len(), 10);
        assert!(goals.iter().all(|g| g.met().is_none()));
    }
}
