//! The runner's first bytes on a routed flow. The intercepting path reads a
//! token preamble and never passes it on; a routed flow is not read by the
//! agent at all, so the program checks the start of the runner's stream
//! against the preamble magic. A flow that starts with it is refused
//! (`FLOW_TOKEN`): the segment carrying the magic's last byte, and so
//! every byte of the token after it, is dropped, and the agent resets both
//! ends. At most the magic's first three bytes reach the target.
use aya_ebpf::programs::TcContext;
use proxy_common::{
    PREAMBLE_MAGIC,
    routed::{FLOW_TOKEN, FlowValue, SCREEN_CLEAR},
};

use crate::packet::Segment;

/// What to do with a runner segment while its flow's first bytes are
/// checked.
pub enum Screen {
    /// Not a preamble (or nothing to check): forward it.
    Pass,
    /// It starts past the bytes checked so far: dropped, so nothing beyond
    /// an unchecked byte arrives; the runner retransmits it in order.
    Hold,
    /// The stream starts with the magic: the flow is refused.
    Token,
}

/// Checks `segment`'s bytes among the stream's first four against the
/// magic, and records how far they matched in `flow.screen_up`.
#[inline(always)]
pub fn screen_up(ctx: &TcContext, flow: &mut FlowValue, segment: &Segment) -> Screen {
    if flow.screen_up == SCREEN_CLEAR || segment.payload == 0 {
        return Screen::Pass;
    }
    let mut matched = flow.screen_up;
    // A segment before the first byte wraps to a huge offset: held too.
    let offset = segment.seq.wrapping_sub(flow.first_seq_up);
    if offset > matched {
        return Screen::Hold;
    }
    let end = offset + segment.payload;
    for (i, expected) in PREAMBLE_MAGIC.iter().enumerate() {
        let i = i as u32;
        if i < matched {
            continue;
        }
        if i >= end {
            break;
        }
        let Ok(byte) = ctx.load::<u8>((segment.payload_at + i - offset) as usize) else {
            return Screen::Hold;
        };
        if byte != *expected {
            flow.screen_up = SCREEN_CLEAR;
            return Screen::Pass;
        }
        matched = i + 1;
    }
    if matched as usize == PREAMBLE_MAGIC.len() {
        flow.state = FLOW_TOKEN;
        return Screen::Token;
    }
    flow.screen_up = matched;
    Screen::Pass
}
