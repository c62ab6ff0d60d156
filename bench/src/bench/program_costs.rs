//! `--bpf-stats`: what each of tcpgate's eBPF programs cost per run in a
//! turn, from the agent's own `/metrics` (`tcpgate_ebpf_program_runs_total`
//! and `..._run_seconds_total`, counted while the kernel's run statistics
//! are on, which the bench holds on for the whole run).

use std::path::Path;

use anyhow::{Context, Result};
use tcpgate_tests::metrics::{parse, scrape_unix};

use super::results::{Metric, Results};

const RUNS: &str = "tcpgate_ebpf_program_runs_total";
const SECONDS: &str = "tcpgate_ebpf_program_run_seconds_total";

/// Each program's (runs, seconds) at one scrape.
#[derive(Debug, Default)]
pub struct Reading(Vec<(String, f64, f64)>);

impl Reading {
    /// Scrapes the agent on `admin`; an agent without the metrics (an
    /// older binary) reads as no programs.
    pub fn take(admin: &Path) -> Result<Reading> {
        let text =
            scrape_unix(admin).with_context(|| format!("--bpf-stats: {}", admin.display()))?;
        let metrics = parse(&text)?;
        let mut programs = Vec::new();
        for program in metrics.label_values(RUNS, "program") {
            let labels = [("program", program.as_str())];
            let runs = metrics.count(RUNS, &labels);
            let seconds = metrics.count(SECONDS, &labels);
            programs.push((program, runs, seconds));
        }
        Ok(Reading(programs))
    }

    /// Adds, per program that ran since `before`, its time per run in ns
    /// (subject `"{turn} {program}"`, without the `tcpgate_` prefix), and
    /// a short summary to the progress `line`; returns the seconds all
    /// of them took since.
    pub fn record_since(
        &self,
        before: &Reading,
        turn: &str,
        results: &mut Results,
        line: &mut String,
    ) -> f64 {
        let (mut parts, mut total) = (Vec::new(), 0.0);
        for (program, runs, seconds) in &self.0 {
            let (runs_before, seconds_before) = before
                .0
                .iter()
                .find(|(p, _, _)| p == program)
                .map_or((0.0, 0.0), |(_, r, s)| (*r, *s));
            let runs = runs - runs_before;
            if runs <= 0.0 {
                continue;
            }
            total += seconds - seconds_before;
            let ns = (seconds - seconds_before) / runs * 1e9;
            let short = program.strip_prefix("tcpgate_").unwrap_or(program);
            results.add(Metric::EbpfRunTime, &format!("{turn} {short}"), ns);
            parts.push(format!("{short} {ns:.0}"));
        }
        if !parts.is_empty() {
            line.push_str(&format!(" [ebpf ns/run: {}]", parts.join(", ")));
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(programs: &[(&str, f64, f64)]) -> Reading {
        Reading(
            programs
                .iter()
                .map(|&(p, r, s)| (p.to_owned(), r, s))
                .collect(),
        )
    }

    #[test]
    fn time_per_run_is_taken_over_the_turn_only() {
        let before = reading(&[
            ("tcpgate_routed_in", 1_000.0, 0.001),
            ("tcpgate_lookup", 10.0, 0.000_01),
        ]);
        let after = reading(&[
            ("tcpgate_routed_in", 3_000.0, 0.002),
            ("tcpgate_lookup", 10.0, 0.000_01),
            ("tcpgate_routed_out", 500.0, 0.000_1),
        ]);
        let (mut results, mut line) = (Results::default(), String::new());
        let total = after.record_since(&before, "grant-routed", &mut results, &mut line);
        assert!((total - 0.0011).abs() < 1e-9, "{total}");
        // 1 ms over 2,000 runs; a program that did not run adds nothing;
        // one new since the first reading counts from zero.
        let median = |s| results.median(Metric::EbpfRunTime, s);
        assert!((median("grant-routed routed_in").expect("in") - 500.0).abs() < 1e-6);
        assert!((median("grant-routed routed_out").expect("out") - 200.0).abs() < 1e-6);
        assert_eq!(median("grant-routed lookup"), None);
        assert_eq!(line, " [ebpf ns/run: routed_in 500, routed_out 200]");
    }
}
