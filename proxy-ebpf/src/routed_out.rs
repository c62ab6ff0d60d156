//! tc egress on the runner-facing interfaces: counts the target -> runner
//! direction of routed flows and tracks its sequence numbers (for the
//! agent's RSTs), telling the agent of each change of a flow's state or
//! flags through `FLOW_EVENTS`. Once a flow has ended only RSTs pass (the
//! agent's, which tell the runner); everything else of it is dropped.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::routed::{
    FLOW_EVENT_CHANGED, FLOW_EXPIRED, FLOW_FIN_DOWN, FLOW_OPEN, FLOW_SEEN_DOWN, FlowValue,
};

use crate::maps::{FLOWS, bump_routed, emit_flow};
use crate::packet::{Segment, TCP_RST, TCP_SYN, close_flags, count_bytes, parse};

#[classifier]
pub fn tcpgate_routed_out(ctx: TcContext) -> i32 {
    let Some(segment) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    let key = segment.key_down();
    let Some(flow) = FLOWS.get_ptr_mut(&key) else {
        return TC_ACT_OK;
    };
    // SAFETY: a successful lookup's value pointer, valid while the program
    // runs; concurrent writers only add to counters.
    let flow = unsafe { &mut *flow };
    if flow.is_removed() {
        // Being removed: as if gone already.
        return TC_ACT_OK;
    }
    let before = (flow.state, flow.flags);
    let action = forward_down(flow, &segment);
    if (flow.state, flow.flags) != before {
        emit_flow(FLOW_EVENT_CHANGED, &key, flow);
    }
    action
}

/// Counts a segment of an open flow; drops one of an ended flow.
#[inline(always)]
fn forward_down(flow: &mut FlowValue, segment: &Segment) -> i32 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if still_open(flow, now) {
        track_down(flow, segment, now);
        return TC_ACT_OK;
    }
    if segment.has(TCP_RST) {
        return TC_ACT_OK;
    }
    flow.dropped += 1;
    bump_routed(|s| &mut s.dropped);
    TC_ACT_SHOT
}

/// Whether the flow may still pass; past its deadline it ends here, in the
/// kernel, whether or not the agent runs.
#[inline(always)]
pub fn still_open(flow: &mut FlowValue, now: u64) -> bool {
    if flow.state != FLOW_OPEN {
        return false;
    }
    if now >= flow.deadline_mono_ns {
        flow.state = FLOW_EXPIRED;
        return false;
    }
    true
}

fn track_down(flow: &mut FlowValue, segment: &Segment, now: u64) {
    flow.packets_down += 1;
    flow.last_mono_ns = now;
    if segment.has(TCP_SYN) {
        if flow.flags & FLOW_SEEN_DOWN == 0 {
            flow.next_seq_down = segment.seq.wrapping_add(1);
            flow.flags |= FLOW_SEEN_DOWN;
        }
    } else if flow.flags & FLOW_SEEN_DOWN != 0 {
        count_bytes(&mut flow.next_seq_down, &mut flow.bytes_down, segment);
    }
    flow.flags |= close_flags(segment, FLOW_FIN_DOWN);
}
