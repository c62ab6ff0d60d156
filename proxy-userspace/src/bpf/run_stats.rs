//! The kernel's run statistics of the agent's own eBPF programs: how often
//! each ran and for how long in all, so an operator can see what the data
//! path costs per packet. The kernel counts only while its statistics are
//! on (`sysctl kernel.bpf_stats_enabled=1`; off by default, since counting
//! adds two clock reads to every run of every program on the machine);
//! otherwise both figures stay where they were.

use std::os::fd::AsFd;

use aya::programs::ProgramFd;

use super::LoadedBpf;
use crate::sys_bpf::{RunCounts, program_run_counts};

/// One program's figures at a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRuns {
    /// The program's name in the object (`tcpgate_routed_in`, ...).
    pub program: String,
    pub counts: RunCounts,
}

/// Descriptors of every program the agent loaded, read at each scrape.
pub struct ProgramRunStats {
    programs: Vec<(String, ProgramFd)>,
}

impl std::fmt::Debug for ProgramRunStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.programs.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ProgramRunStats")
            .field("programs", &names)
            .finish()
    }
}

impl ProgramRunStats {
    /// Every program loaded so far (call once all are), by a descriptor
    /// of its own, so the figures stay readable whatever holds the object.
    #[must_use]
    pub fn of(bpf: &LoadedBpf) -> Self {
        let mut programs = Vec::new();
        for (name, program) in bpf.ebpf.programs() {
            let Ok(fd) = program.fd() else {
                continue; // in the object but not loaded: never runs
            };
            match fd.try_clone() {
                Ok(fd) => programs.push((name.to_owned(), fd)),
                Err(e) => {
                    tracing::warn!(program = name, error = %e, "its run statistics will not be in /metrics")
                }
            }
        }
        programs.sort_by(|a, b| a.0.cmp(&b.0));
        Self { programs }
    }

    /// The programs' current figures, by name; one that cannot be read is
    /// left out (and logged).
    #[must_use]
    pub fn read(&self) -> Vec<ProgramRuns> {
        self.programs
            .iter()
            .filter_map(|(name, fd)| match program_run_counts(fd.as_fd()) {
                Ok(counts) => Some(ProgramRuns {
                    program: name.clone(),
                    counts,
                }),
                Err(e) => {
                    tracing::warn!(program = %name, error = %e, "cannot read a program's run statistics");
                    None
                }
            })
            .collect()
    }
}
