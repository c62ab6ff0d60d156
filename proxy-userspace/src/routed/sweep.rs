//! Removing finished flows from `FLOWS` through `tcpgate_routed_sweep`, a
//! program the agent runs and never attaches: each flow goes only while
//! its entry is still the flow the agent saw finish. A delete by key from
//! here raced a runner reusing the 4-tuple: a SYN that replaced the entry
//! after the poll's last look lost its new entry, and the intercepting
//! path reset the connection (about 1 in 700 connections of a
//! connection-rate bench; docs/routed.md).

use std::io;
use std::os::fd::AsFd;

use aya::programs::{ProgramFd, SchedClassifier};
use proxy_common::program_names;
use proxy_common::routed::{SWEEP_BATCH, SWEEP_HEADER, SweepEntry};

use crate::bpf::LoadedBpf;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("cannot keep the descriptor of {}", program_names::ROUTED_SWEEP)]
    Descriptor(#[source] io::Error),
    #[error(
        "cannot run {} to remove finished routed flows",
        program_names::ROUTED_SWEEP
    )]
    Run(#[source] io::Error),
}

/// The loaded sweep program.
#[derive(Debug)]
pub struct Sweeper {
    program: ProgramFd,
}

impl Sweeper {
    /// Loads the program (verified against this agent's `FLOWS`).
    pub(crate) fn load(bpf: &mut LoadedBpf) -> Result<Self, super::RoutedError> {
        let program = bpf.load_program(program_names::ROUTED_SWEEP, SchedClassifier::load)?;
        Ok(Self::of(program)?)
    }

    /// Keeps a loaded sweep program's descriptor.
    fn of(program: &SchedClassifier) -> Result<Self, SweepError> {
        let fd = program
            .fd()
            .map_err(io::Error::other)
            .and_then(ProgramFd::try_clone)
            .map_err(SweepError::Descriptor)?;
        Ok(Self { program: fd })
    }

    /// Removes each flow whose entry is still the one `entry` names (its
    /// SYN time), `SWEEP_BATCH` per run; returns how many it removed.
    pub fn remove(&self, entries: &[SweepEntry]) -> Result<usize, SweepError> {
        let mut frame = Vec::with_capacity(SWEEP_HEADER + SWEEP_BATCH * size_of::<SweepEntry>());
        let mut removed = 0;
        for chunk in entries.chunks(SWEEP_BATCH) {
            frame.clear();
            frame.resize(SWEEP_HEADER, 0);
            for entry in chunk {
                frame.extend_from_slice(&entry.to_ne_bytes());
            }
            let n = crate::sys_bpf::run_skb_program(self.program.as_fd(), &frame)
                .map_err(SweepError::Run)?;
            removed += n as usize;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests;
