//! Ending a routed flow at its grant's expiry or revocation: its entry is
//! marked ended in the kernel (the programs drop what follows), then both
//! ends are reset with the sequence numbers the programs tracked.

use std::net::SocketAddrV4;
use std::sync::PoisonError;

use proxy_common::routed::{
    FLOW_ENDED, FLOW_FIN_DOWN, FLOW_FIN_UP, FLOW_OPEN, FLOW_SEEN_DOWN, FlowKey, FlowValue,
};

use super::Router;
use super::rst::RstSender;

/// Ends the flow `key` opened at `opened` (its SYN's time: a new flow on
/// the 4-tuple is left alone) and resets both ends; returns its entry as
/// it ended, or `None` when it is gone.
pub(super) fn end(
    router: &Router,
    rst: Option<&RstSender>,
    key: FlowKey,
    opened: u64,
) -> Option<FlowValue> {
    let flow = match router.edits.end(key, opened) {
        Ok(flow) => flow?,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "ending a routed flow from user space");
            end_by_copy(router, key, opened)?
        }
    };
    if let Some(rst) = rst {
        reset(rst, key, &flow);
    }
    Some(flow)
}

/// The fallback when the end program cannot run: a copy of the entry
/// written back ended. Counters added between the read and the write are
/// lost, and a SYN reusing the 4-tuple in between loses its entry.
fn end_by_copy(router: &Router, key: FlowKey, opened: u64) -> Option<FlowValue> {
    let mut map = router.flows.lock().unwrap_or_else(PoisonError::into_inner);
    let mut flow = map
        .get(&key, 0)
        .ok()
        .filter(|f| f.opened_mono_ns == opened)?;
    if flow.state == FLOW_OPEN {
        flow.state = FLOW_ENDED;
        if let Err(e) = map.insert(key, flow, 0) {
            tracing::error!(error = %e, "cannot mark a routed flow ended");
        }
    }
    Some(flow)
}

/// RSTs to the target and, once it has answered, to the runner, at the
/// sequence numbers each expects next (past a FIN it sent).
fn reset(rst: &RstSender, key: FlowKey, flow: &FlowValue) {
    let runner = SocketAddrV4::new(key.runner_addr.into(), key.runner_port);
    let target = SocketAddrV4::new(key.target_addr.into(), key.target_port);
    let fin = |flag| u32::from(flow.flags & flag != 0);
    let up = flow.next_seq_up.wrapping_add(fin(FLOW_FIN_UP));
    if let Err(e) = rst.send(runner, target, up) {
        tracing::warn!(error = %e, "cannot reset a routed flow's target");
    }
    if flow.flags & FLOW_SEEN_DOWN != 0 {
        let down = flow.next_seq_down.wrapping_add(fin(FLOW_FIN_DOWN));
        if let Err(e) = rst.send(target, runner, down) {
            tracing::warn!(error = %e, "cannot reset a routed flow's runner");
        }
    }
}
