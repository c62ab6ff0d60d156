//! Changing `FLOWS` entries through two programs the agent runs and never
//! attaches, so that each change lands only while the entry is still the
//! flow the agent means (its SYN time):
//!
//! - `tcpgate_routed_sweep` removes finished flows. A delete by key from
//!   here raced a runner reusing the 4-tuple: a SYN that replaced the
//!   entry after the poll's last look lost its new entry, and the
//!   intercepting path reset the connection (about 1 in 700 connections
//!   of a connection-rate bench; docs/routed.md).
//! - `tcpgate_routed_end` ends a flow at expiry or revocation by setting
//!   its state in place. A copy read, changed and written back from here
//!   lost the counters the programs added in between, and could overwrite
//!   a new flow on the 4-tuple.

use std::io;
use std::os::fd::AsFd;

use aya::programs::{ProgramFd, SchedClassifier};
use proxy_common::program_names;
use proxy_common::routed::{END_FRAME, FlowKey, FlowValue, SWEEP_BATCH, SWEEP_HEADER, SweepEntry};

use crate::bpf::LoadedBpf;

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("cannot keep the descriptor of {program}")]
    Descriptor {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program} on routed flows")]
    Run {
        program: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The loaded sweep and end programs.
#[derive(Debug)]
pub struct FlowEdits {
    sweep: ProgramFd,
    end: ProgramFd,
}

impl FlowEdits {
    /// Loads both programs (verified against this agent's `FLOWS`).
    pub(crate) fn load(bpf: &mut LoadedBpf) -> Result<Self, super::RoutedError> {
        let sweep = bpf.load_program(program_names::ROUTED_SWEEP, SchedClassifier::load)?;
        let sweep = descriptor(program_names::ROUTED_SWEEP, sweep)?;
        let end = bpf.load_program(program_names::ROUTED_END, SchedClassifier::load)?;
        let end = descriptor(program_names::ROUTED_END, end)?;
        Ok(Self { sweep, end })
    }

    /// Removes each flow whose entry is still the one `entry` names (its
    /// SYN time), `SWEEP_BATCH` per run; returns how many it removed.
    pub fn remove(&self, entries: &[SweepEntry]) -> Result<usize, EditError> {
        let mut frame = Vec::with_capacity(SWEEP_HEADER + SWEEP_BATCH * size_of::<SweepEntry>());
        let mut removed = 0;
        for chunk in entries.chunks(SWEEP_BATCH) {
            frame.clear();
            frame.resize(SWEEP_HEADER, 0);
            for entry in chunk {
                frame.extend_from_slice(&entry.to_ne_bytes());
            }
            let n = run(program_names::ROUTED_SWEEP, &self.sweep, &mut frame)?;
            removed += n as usize;
        }
        Ok(removed)
    }

    /// Ends the flow `key` if its entry is still the one opened at
    /// `opened` (an open flow becomes `FLOW_ENDED`; the programs drop what
    /// follows); returns its entry as it ended, or `None` when `FLOWS`
    /// holds no such flow.
    pub fn end(&self, key: FlowKey, opened: u64) -> Result<Option<FlowValue>, EditError> {
        let mut frame = [0u8; END_FRAME];
        let entry_at = SWEEP_HEADER..SWEEP_HEADER + size_of::<SweepEntry>();
        frame[entry_at.clone()].copy_from_slice(&SweepEntry::new(key, opened).to_ne_bytes());
        if run(program_names::ROUTED_END, &self.end, &mut frame)? == 0 {
            return Ok(None);
        }
        Ok(crate::sys_bpf::read_pod(&frame[entry_at.end..]))
    }

    /// Both programs from an object already loaded (the unit tests').
    #[cfg(test)]
    fn of(sweep: &SchedClassifier, end: &SchedClassifier) -> Result<Self, EditError> {
        Ok(Self {
            sweep: descriptor(program_names::ROUTED_SWEEP, sweep)?,
            end: descriptor(program_names::ROUTED_END, end)?,
        })
    }
}

/// A duplicate of a loaded program's descriptor, kept after the object's
/// programs are dropped.
fn descriptor(program: &'static str, loaded: &SchedClassifier) -> Result<ProgramFd, EditError> {
    loaded
        .fd()
        .map_err(io::Error::other)
        .and_then(ProgramFd::try_clone)
        .map_err(|source| EditError::Descriptor { program, source })
}

fn run(program: &'static str, fd: &ProgramFd, frame: &mut [u8]) -> Result<u32, EditError> {
    crate::sys_bpf::run_skb_program(fd.as_fd(), frame)
        .map_err(|source| EditError::Run { program, source })
}

#[cfg(test)]
mod tests;
