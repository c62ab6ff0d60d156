//! The agent's eBPF programs' run statistics, read from the kernel at each
//! scrape (see [`crate::bpf::run_stats`]): run time ÷ runs is what one run
//! (one packet, one socket lookup) costs.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::bpf::run_stats::{ProgramRunStats, ProgramRuns};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

#[derive(Debug, Default)]
pub struct ProgramMetrics {
    source: Option<ProgramRunStats>,
    runs: Family<ProgramLabels, Counter>,
    run_seconds: Family<ProgramLabels, Counter<f64, AtomicU64>>,
}

impl ProgramMetrics {
    pub fn new(source: Option<ProgramRunStats>) -> Self {
        Self {
            source,
            ..Self::default()
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ebpf_program_runs",
            "Runs of each of the agent's eBPF programs, counted by the kernel only while its run statistics are on (sysctl kernel.bpf_stats_enabled=1)",
            self.runs.clone(),
        );
        registry.register(
            "ebpf_program_run_seconds",
            "Time spent in each of the agent's eBPF programs, counted as ebpf_program_runs is; divided by it, the cost of one run",
            self.run_seconds.clone(),
        );
    }

    /// Reads the kernel's figures, when eBPF is loaded.
    pub fn update(&self) {
        if let Some(source) = &self.source {
            self.record(&source.read());
        }
    }

    pub(super) fn record(&self, figures: &[ProgramRuns]) {
        for figure in figures {
            let labels = ProgramLabels {
                program: figure.program.clone(),
            };
            super::advance(&self.runs.get_or_create(&labels), figure.counts.runs);
            let seconds = self.run_seconds.get_or_create(&labels);
            // Raised to the kernel's total, never lowered (as `advance`).
            let total = figure.counts.run_time_ns as f64 / 1e9;
            let current = seconds.get();
            if total > current {
                seconds.inc_by(total - current);
            }
        }
    }
}
