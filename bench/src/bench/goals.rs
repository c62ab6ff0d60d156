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
        Metric::TakeoverPause => Some(Target::AtMost(100.0)),
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
const TCPGATE_PATHS: [Contender; 3] = [
    Contender::TcpgateEbpf,
    Contender::TcpgateUserspace,
    Contender::TcpgateRouted,
];

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
        Contender::TcpgateRouted => "routed",
        _ => "eBPF",
    }
}

/// A ratio to two decimals; see [`decisive`].
fn ratio_text(q: f64, target: Target) -> String {
    decisive(q, target, 2)
}

/// `value` to `places` decimals, or to as many more (up to four more) as it
/// takes for the figure shown to agree with the verdict: 0.8962 against
/// `≥ 0.9` reads `0.896`, never a missed `0.90`.
fn decisive(value: f64, target: Target, places: usize) -> String {
    let met = target.met_by(value);
    let most = places + 4;
    (places..=most)
        .map(|places| format!("{value:.places$}"))
        .find(|shown| shown.parse::<f64>().is_ok_and(|v| target.met_by(v) == met))
        .unwrap_or_else(|| format!("{value:.most$}"))
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
        let target = Target::AtLeast(0.9);
        goals.push(Goal {
            name: format!("throughput {label}, tcpgate's fastest path vs direct"),
            target,
            unit: "× direct".to_owned(),
            figure: r.zip(best).map(|((q, x, y), (_, path))| Figure {
                value: q,
                shown: format!(
                    "{}× ({path} {x:.2} vs {y:.2} Gbit/s)",
                    ratio_text(q, target)
                ),
            }),
        });
    }
}

/// CPU per GiB (bench processes + kernel threads) against direct.
fn cpu_goal(results: &Results) -> Goal {
    let metric = Metric::CpuPerGibAttributed;
    let best = best_path(results, metric);
    let r = ratio_to(results, metric, best, Contender::Direct.name());
    let target = Target::AtMost(1.2);
    Goal {
        name: "CPU per GiB (bench processes + kernel threads) vs direct".to_owned(),
        target,
        unit: "× direct".to_owned(),
        figure: r.zip(best).map(|((q, x, y), (_, path))| Figure {
            value: q,
            shown: format!("{}× ({path} {x:.3} vs {y:.3} s/GiB)", ratio_text(q, target)),
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
        let target = Target::AtMost(0.5);
        goals.push(Goal {
            name: format!("added request/response latency {label}, tcpgate vs haproxy"),
            target,
            unit: "× HAProxy's".to_owned(),
            figure: r.map(|(e, h, path)| Figure {
                value: e / h,
                // Signed: a path faster than direct (noise) adds less than 0.
                shown: format!(
                    "{}× ({path} {e:+.1} vs {h:+.1} µs over direct)",
                    ratio_text(e / h, target)
                ),
            }),
        });
    }
}

/// Authenticated connection rates against HAProxy's plain TCP rate.
fn connection_goals(results: &Results, goals: &mut Vec<Goal>) {
    let metric = Metric::ConnectionsPerSecond;
    let haproxy = results.median(metric, Contender::Haproxy.name());
    // Each takes tcpgate's fastest path for it: spliced at once, copied
    // first (`agent.splice_after_bytes`), or for a grant also routed.
    let subjects: [(&str, &[&str], f64); 2] = [
        ("preamble", &["preamble", "preamble-copy-first"], 1.0),
        ("grant", &["grant", "grant-copy-first", "grant-routed"], 1.5),
    ];
    for (subject, measured, limit) in subjects {
        let best = measured
            .iter()
            .filter_map(|m| Some((results.median(metric, m)?, *m)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let target = Target::AtLeast(limit);
        let figure = best
            .zip(haproxy)
            .filter(|&(_, h)| h > 0.0)
            .map(|((v, which), h)| {
                let q = ratio_text(v / h, target);
                Figure {
                    value: v / h,
                    shown: if measured.len() > 1 {
                        format!("{q}× ({which} {v:.0} vs {h:.0}/s)")
                    } else {
                        format!("{q}× ({v:.0} vs {h:.0}/s)")
                    },
                }
            });
        goals.push(Goal {
            name: format!("new connections/s, {subject}, vs HAProxy plain TCP"),
            target,
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
    let target = absolute_target(metric)?;
    let figure = results.median(metric, contender).map(|v| Figure {
        value: v,
        shown: format!("{} {unit}", decisive(v, target, 1)),
    });
    Some(Goal {
        name: name.to_owned(),
        target,
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
    goals.extend(takeover_goal(results));
    goals
}

/// Issue 15's goal: the longest pause any streaming session sees during a
/// takeover at 1,000 sessions, p99 over the runs (not the median: one bad
/// takeover is what an operator notices).
fn takeover_goal(results: &Results) -> Option<Goal> {
    let metric = Metric::TakeoverPause;
    let target = absolute_target(metric)?;
    let figure = results
        .summary(metric, Contender::TcpgateEbpf.name())
        .and_then(|s| {
            let runs = super::stats::sorted(s.runs);
            let p99 = super::stats::percentile(&runs, 99.0)?;
            Some(Figure {
                value: p99,
                shown: format!(
                    "{} ms (max of 8 streams, {} runs)",
                    decisive(p99, target, 1),
                    runs.len()
                ),
            })
        });
    Some(Goal {
        name: "longest stream pause during a takeover at 1,000 sessions, p99 (issue 15)".to_owned(),
        target,
        unit: format!(" {}", metric.unit()),
        figure,
    })
}

#[cfg(test)]
#[path = "goals_tests.rs"]
mod tests;
