//! Never attached: the agent runs it with `BPF_PROG_TEST_RUN` to remove
//! the routed flows it saw finish and linger. Its input frame carries, after
//! an Ethernet header, up to `SWEEP_BATCH` entries of 4-tuple and SYN time.
//! A flow is removed only while its `FLOWS` entry is still the one that
//! SYN opened: a new SYN on the 4-tuple (a runner reusing its port) may
//! have replaced it since the agent looked, and a delete by key from user
//! space would remove the new flow, whose next packets the intercepting
//! path then resets. The compare and the delete run back to back in the
//! kernel instead of a poll apart.
use aya_ebpf::{macros::classifier, programs::TcContext};
use proxy_common::routed::{FLOW_REMOVED, FLOW_SEEN_DOWN, SWEEP_BATCH, SWEEP_HEADER, SweepEntry};

use crate::maps::FLOWS;

/// Returns how many flows it removed (the test run's return value).
#[classifier]
pub fn tcpgate_routed_sweep(ctx: TcContext) -> i32 {
    try_sweep(&ctx)
}

fn try_sweep(ctx: &TcContext) -> i32 {
    let mut removed = 0;
    for i in 0..SWEEP_BATCH {
        // The frame ends after the last entry: a short read ends the run.
        let Ok(entry) = ctx.load::<SweepEntry>(SWEEP_HEADER + i * size_of::<SweepEntry>()) else {
            break;
        };
        if claim(&entry) && FLOWS.remove(&entry.key).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether `FLOWS` still holds the flow the entry names (and, for an
/// entry `SWEEP_IF_UNANSWERED`, its target has still not answered); if so,
/// marks it removed (its SYN time set to `FLOW_REMOVED`) in the same step.
#[inline(always)]
fn claim(entry: &SweepEntry) -> bool {
    FLOWS.get_ptr_mut(&entry.key).is_some_and(|flow| {
        // SAFETY: a successful lookup's value pointer, valid while the
        // program runs; the flags are read once, as the egress program
        // may set FLOW_SEEN_DOWN meanwhile.
        let flags = unsafe { core::ptr::read_volatile(&raw const (*flow).flags) };
        if entry.only_if_unanswered() && flags & FLOW_SEEN_DOWN != 0 {
            return false;
        }
        // SAFETY: as above.
        let opened = unsafe { &raw mut (*flow).opened_mono_ns };
        crate::atomic::compare_and_set(opened, entry.opened_mono_ns, FLOW_REMOVED)
    })
}
