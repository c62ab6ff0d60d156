//! tc ingress on the runner-facing interfaces: a SYN from a source holding
//! one live source grant, to a destination and port the grant covers and
//! tcpgate intercepts, starts a routed flow in `FLOWS`; packets of open
//! flows are counted and marked, so the intercept table skips them and the
//! guard lets them through. A flow's start and every change of its state
//! or flags are told to the agent through `FLOW_EVENTS`. Packets of ended
//! flows are dropped; packets of unknown flows are left unmarked, to the
//! intercepting (fail-closed) path.
//! A flow whose runner starts with a token preamble is refused (see
//! [`crate::screen`]): the token never reaches the target.
//! The routed mark is set here only: a packet arriving with it loses it.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::lpm_trie::Key,
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    addr::v4_mapped,
    routed::{
        FLOW_EVENT_CHANGED, FLOW_EVENT_OPENED, FLOW_FIN_DOWN, FLOW_FIN_UP, FLOW_OPEN, FLOW_REMOVED,
        FLOW_RST, FlowKey, FlowValue, MAX_ROUTED_DESTINATIONS,
    },
};

use crate::local_socket::holds_connection;
use crate::maps::{FLOWS, INTERCEPT, ROUTED_CONFIG, ROUTED_SOURCES, bump_routed, emit_flow};
use crate::packet::{Segment, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, close_flags, count_bytes, parse};
use crate::routed_out::still_open;
use crate::screen::{Screen, screen_up};

#[classifier]
pub fn tcpgate_routed_in(ctx: TcContext) -> i32 {
    try_in(&ctx)
}

/// What happened to a packet; each maps to one tc action.
enum Verdict {
    /// Not a routed flow's: the normal path decides.
    NotOurs,
    /// A routed flow's: forwarded with the mark.
    Routed,
    /// An ended flow's: dropped.
    Ended,
    /// A segment held back while the flow's first bytes are checked.
    Held,
    /// The segment that made the flow a preamble's: dropped.
    Token,
}

fn try_in(ctx: &TcContext) -> i32 {
    let Some(mark) = ROUTED_CONFIG.get(0).map(|c| c.mark) else {
        return TC_ACT_OK;
    };
    if mark == 0 {
        return TC_ACT_OK;
    }
    // SAFETY: `skb` is the program's ctx pointer; `mark` is a plain u32
    // field the verifier lets tc programs read at a constant offset.
    let arrived = unsafe { core::ptr::read_volatile(&raw const (*ctx.skb.skb).mark) };
    if arrived == mark {
        ctx.set_mark(0);
        bump_routed(|s| &mut s.forged_marks);
    }
    let verdict = match parse(ctx) {
        Some(segment) => classify(ctx, &segment),
        None => Verdict::NotOurs,
    };
    match verdict {
        Verdict::NotOurs => TC_ACT_OK,
        Verdict::Routed => {
            ctx.set_mark(mark);
            TC_ACT_OK
        }
        Verdict::Ended => {
            bump_routed(|s| &mut s.dropped);
            TC_ACT_SHOT
        }
        Verdict::Held => TC_ACT_SHOT,
        Verdict::Token => {
            bump_routed(|s| &mut s.preambles);
            TC_ACT_SHOT
        }
    }
}

fn classify(ctx: &TcContext, segment: &Segment) -> Verdict {
    let key = segment.key_up();
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut replace = false;
    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: a successful lookup's value pointer, valid while the
        // program runs; concurrent writers only add to counters.
        let flow = unsafe { &mut *flow };
        if flow.is_removed() {
            // Being removed (the sweep, or a SYN on another CPU): gone.
            return Verdict::NotOurs;
        }
        // The entry may be a finished flow's, kept for its close line:
        // a new SYN on its 4-tuple starts a new flow in it, once it has
        // taken the entry from the sweep (only one of them can).
        replace = reuses_finished(flow, segment);
        if !replace {
            return on_flow(ctx, &key, flow, segment, now);
        }
        if !take_over(flow) {
            return Verdict::NotOurs;
        }
    }
    let flags = if replace { BPF_ANY } else { BPF_NOEXIST };
    let verdict = admit(ctx, segment, now, flags);
    if replace && matches!(verdict, Verdict::NotOurs) {
        // Not routed any more: the stale entry must not catch the
        // intercepted connection's packets.
        let _ = FLOWS.remove(&key);
    }
    verdict
}

/// A packet of a known flow; a change of its state or flags is told to
/// the agent.
#[inline(always)]
fn on_flow(
    ctx: &TcContext,
    key: &FlowKey,
    flow: &mut FlowValue,
    segment: &Segment,
    now: u64,
) -> Verdict {
    let before = (flow.state, flow.flags);
    let verdict = forward_up(ctx, flow, segment, now);
    if (flow.state, flow.flags) != before {
        emit_flow(FLOW_EVENT_CHANGED, key, flow);
    }
    verdict
}

#[inline(always)]
fn forward_up(ctx: &TcContext, flow: &mut FlowValue, segment: &Segment, now: u64) -> Verdict {
    if !still_open(flow, now) {
        flow.dropped += 1;
        return Verdict::Ended;
    }
    match screen_up(ctx, flow, segment) {
        Screen::Pass => {}
        Screen::Hold => return Verdict::Held,
        Screen::Token => {
            flow.dropped += 1;
            return Verdict::Token;
        }
    }
    track_up(flow, segment, now);
    Verdict::Routed
}

/// A SYN without data (TCP Fast Open data would come before the first
/// bytes can be checked: the intercepting path takes it).
#[inline(always)]
fn pure_syn(segment: &Segment) -> bool {
    segment.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN && segment.payload == 0
}

/// A new SYN (with data or not) on the 4-tuple of a flow both ends
/// finished (FINs both ways, or a reset) that still lingers in `FLOWS`;
/// not a retransmission of the finished flow's own SYN. [`admit`] decides
/// it like any SYN: one with data is not routed, and the stale entry goes.
#[inline(always)]
fn reuses_finished(flow: &FlowValue, segment: &Segment) -> bool {
    let both_fins = FLOW_FIN_UP | FLOW_FIN_DOWN;
    let finished = flow.flags & FLOW_RST != 0 || flow.flags & both_fins == both_fins;
    flow.state == FLOW_OPEN
        && finished
        && segment.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
        && segment.seq.wrapping_add(1) != flow.first_seq_up
}

/// Marks a finished flow's entry removed, unless the sweep (or another
/// CPU) did first: whether this SYN may replace it.
#[inline(always)]
fn take_over(flow: &mut FlowValue) -> bool {
    let seen = flow.opened_mono_ns;
    seen != FLOW_REMOVED
        && crate::atomic::compare_and_set(&raw mut flow.opened_mono_ns, seen, FLOW_REMOVED)
}

/// Counts a runner -> target segment (see [`count_bytes`]).
fn track_up(flow: &mut FlowValue, segment: &Segment, now: u64) {
    flow.packets_up += 1;
    flow.last_mono_ns = now;
    count_bytes(&mut flow.next_seq_up, &mut flow.bytes_up, segment);
    flow.flags |= close_flags(segment, FLOW_FIN_UP);
}

/// Records a new flow when the source's one grant covers the destination
/// and tcpgate intercepts it; a full map leaves the SYN to the normal path.
/// Only a SYN without data is routed. `flags`: `BPF_NOEXIST`, or
/// `BPF_ANY` to replace a finished flow.
fn admit(ctx: &TcContext, segment: &Segment, now: u64, flags: u32) -> Verdict {
    if !pure_syn(segment) {
        return Verdict::NotOurs;
    }
    // SAFETY: a map value, valid while the program runs; read in place
    // (a copy would not fit the stack beside the flow's value). The agent
    // replaces a source's record whole, as it would under a copy.
    let Some(source) = (unsafe { ROUTED_SOURCES.get(&segment.src) }) else {
        return Verdict::NotOurs;
    };
    if now >= source.deadline_mono_ns {
        return Verdict::NotOurs;
    }
    let mut covered = false;
    for (i, destination) in source.destinations.iter().enumerate() {
        if i < MAX_ROUTED_DESTINATIONS
            && (i as u32) < source.count
            && destination.covers(segment.dst, segment.dport)
        {
            covered = true;
            break;
        }
    }
    if !covered || !intercepted(segment) || holds_connection(ctx, segment) {
        return Verdict::NotOurs;
    }
    let flow = FlowValue {
        grant_id: source.grant_id,
        deadline_mono_ns: source.deadline_mono_ns,
        opened_mono_ns: now,
        last_mono_ns: now,
        packets_up: 1,
        next_seq_up: segment.seq.wrapping_add(1),
        first_seq_up: segment.seq.wrapping_add(1),
        state: FLOW_OPEN,
        ..FlowValue::default()
    };
    let key = segment.key_up();
    match FLOWS.insert(&key, &flow, u64::from(flags)) {
        Ok(()) => {
            bump_routed(|s| &mut s.flows_opened);
            emit_flow(FLOW_EVENT_OPENED, &key, &flow);
            Verdict::Routed
        }
        Err(_) => {
            bump_routed(|s| &mut s.flows_full);
            Verdict::NotOurs
        }
    }
}

/// Whether tcpgate intercepts the destination and port: a grant never
/// routes around the intercepting path to anything it does not cover.
fn intercepted(segment: &Segment) -> bool {
    let key = Key::new(128, v4_mapped(segment.dst));
    INTERCEPT
        .get(&key)
        .is_some_and(|value| value.contains(segment.dport))
}
