//! Never attached: the agent runs it with `BPF_PROG_TEST_RUN` to end a
//! routed flow whose grant expired or was revoked. Its input frame carries,
//! after an Ethernet header, the flow's 4-tuple and SYN time
//! (`SweepEntry`), then room for the flow's entry, which it writes back as
//! it ended (the agent's RSTs need its sequence numbers). The state is set
//! in place: counters the programs add meanwhile are kept, where a copy
//! written back from user space overwrote them, and a flow a new SYN
//! started on the 4-tuple in between is left alone.
use aya_ebpf::{macros::classifier, programs::TcContext};
use proxy_common::routed::{FLOW_ENDED, FLOW_OPEN, SWEEP_HEADER, SweepEntry};

use crate::maps::FLOWS;

/// Returns 1 when it found the flow (and wrote its entry back), else 0.
#[classifier]
pub fn tcpgate_routed_end(ctx: TcContext) -> i32 {
    i32::from(try_end(&ctx))
}

fn try_end(ctx: &TcContext) -> bool {
    let Ok(entry) = ctx.load::<SweepEntry>(SWEEP_HEADER) else {
        return false;
    };
    let Some(flow) = FLOWS.get_ptr_mut(&entry.key) else {
        return false;
    };
    // SAFETY: a successful lookup's value pointer, valid while the program
    // runs; concurrent writers only add to counters and flags.
    let flow = unsafe { &mut *flow };
    // Another flow on the 4-tuple, or one being removed (its SYN time is
    // then `FLOW_REMOVED`, never an entry's): not the one to end.
    if flow.opened_mono_ns != entry.opened_mono_ns {
        return false;
    }
    if flow.state == FLOW_OPEN {
        flow.state = FLOW_ENDED;
    }
    let ended = *flow;
    ctx.store(SWEEP_HEADER + size_of::<SweepEntry>(), &ended, 0)
        .is_ok()
}
