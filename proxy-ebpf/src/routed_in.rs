//! tc ingress on the runner-facing interfaces: a SYN from a source holding
//! one live source grant, to a destination and port the grant covers and
//! tcpgate intercepts, starts a routed flow in `FLOWS`; packets of open
//! flows are counted and marked, so the intercept table skips them and the
//! guard lets them through. Packets of ended flows are dropped; packets of
//! unknown flows are left unmarked, to the intercepting (fail-closed) path.
//! A flow whose runner starts with a token preamble is refused (see
//! [`crate::screen`]): the token never reaches the target.
//! The routed mark is set here only: a packet arriving with it loses it.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::lpm_trie::Key,
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    addr::v4_mapped,
    routed::{FLOW_FIN_UP, FLOW_OPEN, FlowValue, MAX_ROUTED_DESTINATIONS},
};

use crate::maps::{FLOWS, INTERCEPT, ROUTED_CONFIG, ROUTED_SOURCES, bump_routed};
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
    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: a successful lookup's value pointer, valid while the
        // program runs; concurrent writers only add to counters.
        let flow = unsafe { &mut *flow };
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
        return Verdict::Routed;
    }
    // A SYN with data (TCP Fast Open) would carry bytes before the first
    // bytes can be checked: the intercepting path takes it.
    if segment.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN || segment.payload != 0 {
        return Verdict::NotOurs;
    }
    admit(segment, now)
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
fn admit(segment: &Segment, now: u64) -> Verdict {
    // SAFETY: the value is copied out before anything else touches the map.
    let Some(source) = (unsafe { ROUTED_SOURCES.get(&segment.src) }).copied() else {
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
    if !covered || !intercepted(segment) {
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
    match FLOWS.insert(&segment.key_up(), &flow, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            bump_routed(|s| &mut s.flows_opened);
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
