//! The `FLOW_EVENTS` ring: the tc programs write a record when they start a
//! flow and whenever a flow's state or flags change, so the agent learns of
//! each flow with constant work instead of reading `FLOWS` whole every
//! poll (at thousands of flows a second, that read was most of its time:
//! docs/bench/notes-issue-17.md). A record the ring had no room for is
//! counted in `RoutedStats::events_lost`; the flow watch then reads
//! `FLOWS` whole, so nothing is missed, only learnt later.

use aya::maps::{MapData, RingBuf};
use proxy_common::routed::{FLOW_EVENT_CHANGED, FLOW_EVENT_OPENED, FlowEvent, FlowKey, FlowValue};

/// What a record says of its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowChange {
    /// The program started the flow at its SYN.
    Opened,
    /// Its state or flags changed.
    Changed,
}

impl FlowChange {
    fn from_kind(kind: u32) -> Option<Self> {
        match kind {
            FLOW_EVENT_OPENED => Some(Self::Opened),
            FLOW_EVENT_CHANGED => Some(Self::Changed),
            _ => None,
        }
    }
}

/// The agent's end of the ring.
pub struct FlowEvents {
    ring: RingBuf<MapData>,
}

impl FlowEvents {
    #[must_use]
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Hands every queued record to `each`, oldest first.
    pub fn drain(&mut self, mut each: impl FnMut(FlowChange, FlowKey, FlowValue)) {
        while let Some(item) = self.ring.next() {
            if let Some((change, key, flow)) = decode(&item) {
                each(change, key, flow);
            }
        }
    }
}

/// One record, or `None` for bytes that are not one (never written by our
/// programs; skipped rather than trusted).
fn decode(bytes: &[u8]) -> Option<(FlowChange, FlowKey, FlowValue)> {
    let event: FlowEvent = crate::sys_bpf::read_pod(bytes)?;
    Some((FlowChange::from_kind(event.kind)?, event.key, event.flow))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u32) -> Vec<u8> {
        let event = FlowEvent {
            key: FlowKey {
                runner_addr: [198, 51, 100, 7],
                target_addr: [192, 0, 2, 10],
                runner_port: 40_000,
                target_port: 5432,
            },
            kind,
            flow: FlowValue {
                opened_mono_ns: 42,
                bytes_up: 7,
                ..FlowValue::default()
            },
        };
        // SAFETY: FlowEvent is plain data; its bytes are all initialised.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&event).cast::<u8>(),
                size_of::<FlowEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn records_decode_to_their_change_key_and_entry() {
        let (change, key, flow) = decode(&record(FLOW_EVENT_OPENED)).expect("a record");
        assert_eq!(change, FlowChange::Opened);
        assert_eq!(key.target_port, 5432);
        assert_eq!((flow.opened_mono_ns, flow.bytes_up), (42, 7));
        let (change, ..) = decode(&record(FLOW_EVENT_CHANGED)).expect("a record");
        assert_eq!(change, FlowChange::Changed);
    }

    #[test]
    fn short_records_and_unknown_kinds_are_skipped() {
        let whole = record(FLOW_EVENT_OPENED);
        assert!(decode(&whole[..whole.len() - 1]).is_none());
        assert!(decode(&record(0)).is_none());
        assert!(decode(&record(99)).is_none());
    }
}
