//! Reading libFuzzer's output: the status lines (`#N pulse cov: ..`), the
//! final `stat::` lines and the path of a crash artifact.

/// What libFuzzer reported about one run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub cov: Option<u64>,
    pub ft: Option<u64>,
    /// Corpus units when fuzzing started (after loading) and at the end.
    pub corpus_start: Option<u64>,
    pub corpus_end: Option<u64>,
    pub execs: Option<u64>,
    pub exec_per_sec: Option<u64>,
    pub new_units: Option<u64>,
    pub peak_rss_mb: Option<u64>,
    /// The input that crashed the target, as libFuzzer wrote it.
    pub artifact: Option<String>,
}

impl Stats {
    /// Folds one line of libFuzzer's (or cargo-fuzz's) output in.
    pub fn read_line(&mut self, line: &str) {
        let line = line.trim();
        if let Some(path) = line.split("Test unit written to ").nth(1) {
            self.artifact = Some(path.trim().to_owned());
        }
        if let Some((key, value)) = line.strip_prefix("stat::").and_then(|s| s.split_once(':')) {
            let value = value.trim().parse().ok();
            match key {
                "number_of_executed_units" => self.execs = value,
                "average_exec_per_sec" => self.exec_per_sec = value,
                "new_units_added" => self.new_units = value,
                "peak_rss_mb" => self.peak_rss_mb = value,
                _ => {}
            }
            return;
        }
        // `#4096 pulse  cov: 1 ft: 2 corp: 3/4b exec/s: 5 rss: 6Mb`, and in
        // fork mode `#4096: cov: 1 ft: 2 corp: 3 exec/s: 5 ...`.
        if !line.starts_with('#') || !line.contains(" cov: ") {
            return;
        }
        let field = |name: &str| -> Option<u64> {
            let rest = line.split(&format!(" {name}: ")).nth(1)?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        self.cov = field("cov").or(self.cov);
        self.ft = field("ft").or(self.ft);
        let corp = field("corp");
        if line.contains("INITED ") {
            self.corpus_start = corp;
        }
        self.corpus_end = corp.or(self.corpus_end);
        if let Some(rate) = field("exec/s") {
            self.exec_per_sec = Some(rate);
        }
        if let Some(runs) = line
            .strip_prefix('#')
            .and_then(|s| s.split([':', ' ', '\t']).next())
            .and_then(|n| n.parse().ok())
        {
            self.execs = Some(runs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(lines: &[&str]) -> Stats {
        let mut s = Stats::default();
        for l in lines {
            s.read_line(l);
        }
        s
    }

    #[test]
    fn reads_a_finished_run() {
        let s = read(&[
            "INFO: Seed: 2876011104",
            "#2\tINITED cov: 412 ft: 515 corp: 16/1201b exec/s: 0 rss: 48Mb",
            "#57\tNEW    cov: 420 ft: 530 corp: 17/1299b lim: 4 exec/s: 0 rss: 49Mb L: 98/2000 MS: 1 ChangeBit-",
            "#131072\tpulse  cov: 501 ft: 1210 corp: 190/20Kb lim: 1200 exec/s: 43690 rss: 80Mb",
            "#2617433\tDONE   cov: 533 ft: 1377 corp: 231/25Kb lim: 4096 exec/s: 43623 rss: 81Mb",
            "Done 2617433 runs in 60 second(s)",
            "stat::number_of_executed_units: 2617433",
            "stat::average_exec_per_sec:     43623",
            "stat::new_units_added:          215",
            "stat::slowest_unit_time_sec:    0",
            "stat::peak_rss_mb:              81",
        ]);
        assert_eq!(
            s,
            Stats {
                cov: Some(533),
                ft: Some(1377),
                corpus_start: Some(16),
                corpus_end: Some(231),
                execs: Some(2_617_433),
                exec_per_sec: Some(43623),
                new_units: Some(215),
                peak_rss_mb: Some(81),
                artifact: None,
            }
        );
    }

    #[test]
    fn reads_fork_mode_lines_and_crash_artifacts() {
        let s = read(&[
            "#4096: cov: 300 ft: 700 corp: 90 exec/s: 1200 oom/timeout/crash: 0/0/1 time: 9s job: 3 dft_time: 0",
            "==123== ERROR: libFuzzer: deadly signal",
            "artifact_prefix='/w/fuzz/artifacts/preamble/'; Test unit written to /w/fuzz/artifacts/preamble/crash-da39a3ee",
        ]);
        assert_eq!(
            (s.cov, s.ft, s.corpus_end, s.execs),
            (Some(300), Some(700), Some(90), Some(4096))
        );
        assert_eq!(s.exec_per_sec, Some(1200));
        assert_eq!(
            s.artifact.as_deref(),
            Some("/w/fuzz/artifacts/preamble/crash-da39a3ee")
        );
    }
}
