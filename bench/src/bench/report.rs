//! The results as a terminal table, a Markdown table for the README, and
//! results.json.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::json;

use super::contender::Contender;
use super::goals::Goal;
use super::machine::Machine;
use super::results::{Metric, Results};
use super::settings::Settings;
use super::stats::Summary;

/// What each metric's ratios are taken against.
fn references(metric: Metric) -> &'static [&'static str] {
    // Connection rates and the whole cycle's CPU have plain TCP, directly
    // and through HAProxy, as anchors; the proxy's own CPU per connection
    // compares with the no-auth agent.
    if metric.is_datapath()
        || matches!(
            metric,
            Metric::ConnectionsPerSecond | Metric::CpuPerConnectionAttributed
        )
    {
        &["direct", "haproxy"]
    } else if metric == Metric::AgentCpuPerConnection {
        &["no-auth"]
    } else {
        &[]
    }
}

fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        format!("{value:.0}")
    } else if magnitude >= 100.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// One row per subject: name, median, spread, ratios.
fn rows(results: &Results, metric: Metric) -> Vec<[String; 5]> {
    let refs = references(metric);
    results
        .subjects(metric)
        .into_iter()
        .filter_map(|subject| {
            let s = results.summary(metric, subject)?;
            let ratio = |i: usize| {
                refs.get(i)
                    .and_then(|r| results.median(metric, r))
                    .filter(|&r| r != 0.0)
                    .map(|r| format!("{:.2}×", s.median / r))
                    .unwrap_or_default()
            };
            Some([
                subject.to_owned(),
                number(s.median),
                spread(&s),
                ratio(0),
                ratio(1),
            ])
        })
        .collect()
}

fn spread(s: &Summary) -> String {
    format!("{}–{}", number(s.min), number(s.max))
}

fn better(metric: Metric) -> &'static str {
    if metric.higher_is_better() {
        "higher is better"
    } else {
        "lower is better"
    }
}

/// The table printed at the end of a run.
pub fn terminal(results: &Results, goals: &[Goal]) -> String {
    let mut out = String::new();
    for metric in Metric::ALL {
        let rows = rows(results, metric);
        if rows.is_empty() {
            continue;
        }
        let refs = references(metric);
        let _ = writeln!(
            out,
            "\n{} [{}, {}]",
            metric.title(),
            metric.unit(),
            better(metric)
        );
        let head = |i: usize| refs.get(i).map(|r| format!("×{r}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<18} {:>10} {:>19} {:>9} {:>9}",
            "",
            "median",
            "min–max",
            head(0),
            head(1)
        );
        for [name, median, spread, r0, r1] in rows {
            let _ = writeln!(
                out,
                "  {name:<18} {median:>10} {spread:>19} {r0:>9} {r1:>9}"
            );
        }
    }
    let _ = writeln!(out, "\ngoals (targets, not assertions)");
    for g in goals {
        let _ = writeln!(
            out,
            "  {:<6} {:<58} {:<44} target {}",
            g.verdict(),
            g.name,
            g.shown(),
            g.target_text()
        );
    }
    out
}

/// The same as Markdown, for the README.
pub fn markdown(
    results: &Results,
    goals: &[Goal],
    machine: &Machine,
    settings: &Settings,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured {} ({} mode, {} runs per figure; median and min–max), load average {} before and {} after; \
         TCP congestion control {} in the bench's namespaces (machine default {}){}{}.\n",
        machine.date,
        settings.mode,
        settings.runs,
        machine.load_before,
        machine.load_after,
        settings.congestion_control,
        machine.congestion_control_default,
        if settings.rps {
            "; RPS over all CPUs on the bastion's links"
        } else {
            ""
        },
        if settings.bpf_stats {
            "; the kernel's eBPF run statistics on (--bpf-stats: two clock reads added to every program run)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "| metric | contender | median | min–max | × direct | × HAProxy |"
    );
    let _ = writeln!(out, "| --- | --- | ---: | ---: | ---: | ---: |");
    for metric in Metric::ALL {
        let refs = references(metric);
        for [name, median, spread, r0, r1] in rows(results, metric) {
            // The CPU per connection compares with the no-auth agent instead.
            let extra = if refs.len() == 1 && !r0.is_empty() {
                format!(" ({r0} no-auth)")
            } else {
                String::new()
            };
            let (d, h) = if refs.len() == 2 {
                (r0, r1)
            } else {
                (String::new(), String::new())
            };
            let _ = writeln!(
                out,
                "| {} ({}) | {name} | {median}{extra} | {spread} | {d} | {h} |",
                metric.title(),
                metric.unit()
            );
        }
    }
    let _ = writeln!(out, "\n| goal | measured | target | |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    for g in goals {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            g.name,
            g.shown(),
            g.target_text(),
            g.verdict()
        );
    }
    out
}

pub fn json(
    results: &Results,
    goals: &[Goal],
    machine: &Machine,
    settings: &Settings,
) -> serde_json::Value {
    let figures: Vec<serde_json::Value> = results
        .series
        .iter()
        .filter_map(|series| {
            let s = Summary::of(&series.runs)?;
            Some(json!({
                "metric": series.metric,
                "title": series.metric.title(),
                "unit": series.metric.unit(),
                "higher_is_better": series.metric.higher_is_better(),
                "subject": series.subject,
                "median": s.median,
                "min": s.min,
                "max": s.max,
                "q1": s.q1,
                "q3": s.q3,
                "runs": s.runs,
            }))
        })
        .collect();
    json!({
        "tool": "cargo xtask bench (tcpgate-bench bench)",
        "settings": settings,
        "machine": machine,
        "agent_build": "release (cargo build --release -p proxy-userspace)",
        "contenders": Contender::ALL.map(Contender::name),
        "figures": figures,
        "goals": goals.iter().map(goal_json).collect::<Vec<_>>(),
        "notes": results.notes,
    })
}

/// A goal as results.json has it: the target rendered, and its limit.
fn goal_json(goal: &Goal) -> serde_json::Value {
    json!({
        "goal": goal.name,
        "value": goal.figure.as_ref().map(|f| f.value),
        "shown": goal.shown(),
        "target": goal.target_text(),
        "limit": goal.target.limit(),
        "met": goal.met(),
    })
}

/// Writes results.json, results.md and chart.svg into `dir`.
pub fn write_all(
    dir: &Path,
    results: &Results,
    goals: &[Goal],
    machine: &Machine,
    settings: &Settings,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    };
    write(
        "results.json",
        serde_json::to_string_pretty(&json(results, goals, machine, settings))?,
    )?;
    write("results.md", markdown(results, goals, machine, settings))?;
    write("chart.svg", super::svg::chart(results, machine, settings))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Results {
        let mut r = Results::default();
        for (c, v) in [("direct", 10.0), ("tcpgate-ebpf", 8.0), ("haproxy", 4.0)] {
            r.add(Metric::ThroughputOneStream, c, v);
            r.add(Metric::ThroughputOneStream, c, v + 1.0);
        }
        for (c, v) in [
            ("direct", 40_000.0),
            ("haproxy", 10_000.0),
            ("preamble", 15_000.0),
        ] {
            r.add(Metric::ConnectionsPerSecond, c, v);
        }
        r.add(Metric::AgentCpuPerConnection, "no-auth", 100.0);
        r.add(Metric::AgentCpuPerConnection, "haproxy", 50.0);
        for (c, v) in [
            ("direct", 80.0),
            ("haproxy", 160.0),
            ("grant-routed", 100.0),
        ] {
            r.add(Metric::CpuPerConnectionAttributed, c, v);
        }
        r
    }

    #[test]
    fn ratios_against_direct_and_haproxy() {
        let r = sample();
        let throughput = rows(&r, Metric::ThroughputOneStream);
        let ebpf = throughput
            .iter()
            .find(|row| row[0] == "tcpgate-ebpf")
            .expect("row");
        // medians: direct 10.5, eBPF 8.5, HAProxy 4.5
        assert_eq!(ebpf[1], "8.50");
        assert_eq!(ebpf[2], "8.00–9.00");
        assert_eq!(ebpf[3], "0.81×");
        assert_eq!(ebpf[4], "1.89×");
        let rates = rows(&r, Metric::ConnectionsPerSecond);
        let preamble = rates.iter().find(|row| row[0] == "preamble").expect("row");
        assert_eq!((&*preamble[3], &*preamble[4]), ("0.38×", "1.50×"));
        let cpu = rows(&r, Metric::AgentCpuPerConnection);
        assert_eq!((&*cpu[1][0], &*cpu[1][3]), ("haproxy", "0.50×"));
        let cycle = rows(&r, Metric::CpuPerConnectionAttributed);
        let routed = cycle
            .iter()
            .find(|row| row[0] == "grant-routed")
            .expect("row");
        assert_eq!((&*routed[3], &*routed[4]), ("1.25×", "0.62×"));
    }

    #[test]
    fn terminal_table_lists_every_measured_metric() {
        let r = sample();
        let text = terminal(&r, &super::super::goals::evaluate(&r));
        assert!(
            text.contains("throughput, 1 stream [Gbit/s, higher is better]"),
            "{text}"
        );
        assert!(text.contains("×haproxy"), "{text}");
        assert!(
            !text.contains("teardown after grant expiry p50 ["),
            "{text}"
        );
        assert!(text.contains("MISSED"), "{text}");
    }
}
