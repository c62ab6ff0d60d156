//! Source 2: the pinned `flows` map of routed grants
//! (`[intercept.routed_grants]`, docs/routed.md). A flow has no session
//! record: its id is derived from the flow as the agent derives it for the
//! audit lines ([`crate::routed::flows::session_id`]), its subject comes
//! from the pinned `grants` map, its times from `CLOCK_MONOTONIC`.
//!
//! Only live flows are listed: one the agent or the kernel ended (expiry,
//! revocation), or that both ends closed or reset, stays in the map for
//! `linger` with its final counters for the `session_close` line, but is
//! no longer a session; it is hidden at once.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::{Duration, SystemTime};

use proxy_common::addr::read_str;
use proxy_common::routed::{FLOW_FIN_DOWN, FLOW_FIN_UP, FLOW_OPEN, FLOW_RST, FlowKey, FlowValue};

use super::{Datapath, SessionRow, Source};
use crate::pinned::{PinnedError, PinnedMaps};
use crate::routed::sources::monotonic_ns;

/// The rows of the live routed flows; `Ok(None)` when the agent pins no
/// `flows` map (routed grants are not configured).
pub fn read(maps: &PinnedMaps, now: SystemTime) -> Result<Option<Vec<SessionRow>>, PinnedError> {
    let flows = match maps.flows() {
        Ok(flows) => flows,
        Err(PinnedError::NoMap { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let live: Vec<_> = flows.into_iter().filter(|(_, f)| is_live(f)).collect();
    // The subjects, when the grants map can be read (the ids are enough).
    let subjects: HashMap<u64, String> = if live.is_empty() {
        HashMap::new()
    } else {
        maps.grants()
            .unwrap_or_default()
            .iter()
            .map(|g| (g.grant_id, read_str(&g.subject).to_owned()))
            .collect()
    };
    let clock = Clock {
        wall: now,
        mono_ns: monotonic_ns(),
    };
    Ok(Some(
        live.iter()
            .map(|(key, flow)| {
                let mut row = row(key, flow, &clock);
                if let Some(subject) = subjects.get(&flow.grant_id) {
                    subject.clone_into(&mut row.subject);
                }
                row
            })
            .collect(),
    ))
}

/// Open, and not closed by both ends or reset (nor being removed).
pub fn is_live(flow: &FlowValue) -> bool {
    flow.state == FLOW_OPEN
        && !flow.is_removed()
        && flow.flags & FLOW_RST == 0
        && flow.flags & (FLOW_FIN_UP | FLOW_FIN_DOWN) != FLOW_FIN_UP | FLOW_FIN_DOWN
}

/// One reading of both clocks, to turn the flows' monotonic times into
/// wall-clock times.
struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    fn wall(&self, mono_ns: u64) -> SystemTime {
        if mono_ns <= self.mono_ns {
            self.wall - Duration::from_nanos(self.mono_ns - mono_ns)
        } else {
            self.wall + Duration::from_nanos(mono_ns - self.mono_ns)
        }
    }
}

fn row(key: &FlowKey, flow: &FlowValue, clock: &Clock) -> SessionRow {
    let runner = SocketAddrV4::new(key.runner_addr.into(), key.runner_port);
    let target = SocketAddrV4::new(key.target_addr.into(), key.target_port);
    let id = crate::routed::flows::session_id(key, flow.opened_mono_ns);
    let mut row = SessionRow::new(format!("{id:016x}"), Source::RoutedFlows, Datapath::Routed);
    row.grant_id = (flow.grant_id != 0).then(|| format!("{:016x}", flow.grant_id));
    row.client = runner.to_string();
    row.destination = target.to_string();
    row.upstream = target.to_string();
    row.auth = "source_grant";
    let expires = (flow.deadline_mono_ns != 0).then(|| clock.wall(flow.deadline_mono_ns));
    row.set_times(clock.wall, clock.wall(flow.opened_mono_ns), expires);
    row.bytes_up = flow.bytes_up;
    row.bytes_down = flow.bytes_down;
    row.packets_up = flow.packets_up;
    row.packets_down = flow.packets_down;
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::routed::{FLOW_ENDED, FLOW_EXPIRED, FLOW_REMOVED, FLOW_SEEN_DOWN};

    #[test]
    fn only_flows_neither_ended_nor_closed_by_both_ends_are_live() {
        let flow = |state, flags| FlowValue {
            state,
            flags,
            ..FlowValue::default()
        };
        assert!(is_live(&flow(FLOW_OPEN, FLOW_SEEN_DOWN)));
        assert!(is_live(&flow(FLOW_OPEN, FLOW_SEEN_DOWN | FLOW_FIN_UP)));
        assert!(!is_live(&flow(FLOW_OPEN, FLOW_FIN_UP | FLOW_FIN_DOWN)));
        assert!(!is_live(&flow(FLOW_OPEN, FLOW_RST)));
        assert!(!is_live(&flow(FLOW_ENDED, 0)));
        assert!(!is_live(&flow(FLOW_EXPIRED, 0)));
        let being_removed = FlowValue {
            opened_mono_ns: FLOW_REMOVED,
            ..flow(FLOW_OPEN, FLOW_SEEN_DOWN)
        };
        assert!(!is_live(&being_removed));
    }

    #[test]
    fn a_flow_row_carries_the_agents_session_id_and_its_counters() {
        let key = FlowKey {
            runner_addr: [198, 51, 100, 7],
            target_addr: [192, 0, 2, 10],
            runner_port: 40_000,
            target_port: 9000,
        };
        let flow = FlowValue {
            grant_id: 0xab,
            opened_mono_ns: 5_000_000_000,
            deadline_mono_ns: 65_000_000_000,
            bytes_up: 1234,
            bytes_down: 99,
            packets_up: 3,
            packets_down: 2,
            state: FLOW_OPEN,
            ..FlowValue::default()
        };
        let clock = Clock {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
            mono_ns: 15_000_000_000,
        };
        let row = row(&key, &flow, &clock);
        let id = crate::routed::flows::session_id(&key, flow.opened_mono_ns);
        assert_eq!(row.session_id, format!("{id:016x}"));
        assert_eq!(row.grant_id.as_deref(), Some("00000000000000ab"));
        assert_eq!(
            (row.client.as_str(), row.destination.as_str()),
            ("198.51.100.7:40000", "192.0.2.10:9000")
        );
        assert_eq!(
            (row.bytes_up, row.bytes_down, row.packets_up),
            (1234, 99, 3)
        );
        assert_eq!(row.datapath, Datapath::Routed);
        assert!((row.age_seconds - 10.0).abs() < 1e-6, "{}", row.age_seconds);
        assert_eq!(row.time_left_seconds.map(f64::round), Some(50.0));
    }
}
