//! One list out of the three sources, and rates between two readings.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Instant;

use super::SessionRow;

/// What identifies a session across sources and readings: its id, and the
/// taken-over agent draining it (a successor's own sessions are not the
/// same as those its predecessor drains, whatever their ids).
type Key = (Option<u32>, String);

fn key(row: &SessionRow) -> Key {
    (row.draining_agent_pid, row.session_id.clone())
}

/// The rows of every source, one per session. Sources come in order of
/// precedence (pinned map, then routed flows, then operator socket): a
/// session several list keeps the first one's fields, with each
/// direction's byte count the largest any source read. (A user-space
/// session's pinned record counts its bytes only when it ends; the agent's
/// operator socket counts them as they go.)
#[must_use]
pub fn merge(sources: Vec<Vec<SessionRow>>) -> Vec<SessionRow> {
    let mut out: Vec<SessionRow> = Vec::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    for row in sources.into_iter().flatten() {
        match index.entry(key(&row)) {
            Entry::Occupied(at) => {
                let kept = &mut out[*at.get()];
                kept.bytes_up = kept.bytes_up.max(row.bytes_up);
                kept.bytes_down = kept.bytes_down.max(row.bytes_down);
                for source in row.listed_by {
                    if !kept.listed_by.contains(&source) {
                        kept.listed_by.push(source);
                    }
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(out.len());
                out.push(row);
            }
        }
    }
    out.sort_by(|a, b| {
        (a.started_at_unix_ms, &a.session_id).cmp(&(b.started_at_unix_ms, &b.session_id))
    });
    out
}

/// Sets each row's rate from its counters in an earlier reading of the
/// same session, `elapsed` apart (none for a session new since then).
pub fn set_rates(rows: &mut [SessionRow], earlier: Option<(&[SessionRow], Instant)>, now: Instant) {
    let Some((earlier, at)) = earlier else {
        return;
    };
    let secs = now.duration_since(at).as_secs_f64();
    if secs <= 0.0 {
        return;
    }
    let before: HashMap<Key, (u64, u64)> = earlier
        .iter()
        .map(|r| (key(r), (r.bytes_up, r.bytes_down)))
        .collect();
    #[allow(clippy::cast_precision_loss, reason = "a rate")]
    let per_second = |new: u64, old: u64| new.saturating_sub(old) as f64 / secs;
    for row in rows {
        if let Some((up, down)) = before.get(&key(row)) {
            row.rate_up_bytes_per_second = Some(per_second(row.bytes_up, *up));
            row.rate_down_bytes_per_second = Some(per_second(row.bytes_down, *down));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Datapath, Source};
    use super::*;
    use std::time::Duration;

    fn session(id: &str, source: Source, datapath: Datapath, bytes: (u64, u64)) -> SessionRow {
        let mut row = SessionRow::new(id.to_owned(), source, datapath);
        (row.bytes_up, row.bytes_down) = bytes;
        row
    }

    #[test]
    fn a_session_listed_by_the_pinned_map_and_the_socket_is_one_row() {
        let pinned = vec![
            session("a", Source::PinnedSessions, Datapath::Ebpf, (500, 7)),
            session("b", Source::PinnedSessions, Datapath::Userspace, (0, 0)),
        ];
        let routed = vec![session("r", Source::RoutedFlows, Datapath::Routed, (3, 4))];
        let socket = vec![
            session("a", Source::OperatorSocket, Datapath::Userspace, (400, 7)),
            session("b", Source::OperatorSocket, Datapath::Userspace, (90, 80)),
            session("c", Source::OperatorSocket, Datapath::Userspace, (1, 2)),
        ];
        let rows = merge(vec![pinned, routed, socket]);
        let by_id: HashMap<&str, &SessionRow> =
            rows.iter().map(|r| (r.session_id.as_str(), r)).collect();
        assert_eq!(rows.len(), 4, "{rows:?}");
        let a = by_id["a"];
        // The pinned record's path and the kernel's larger counts.
        assert_eq!(
            (a.datapath, a.bytes_up, a.bytes_down),
            (Datapath::Ebpf, 500, 7)
        );
        assert_eq!(
            a.listed_by,
            vec![Source::PinnedSessions, Source::OperatorSocket]
        );
        // A user-space session's record has no bytes yet: the socket's.
        let b = by_id["b"];
        assert_eq!(
            (b.datapath, b.bytes_up, b.bytes_down),
            (Datapath::Userspace, 90, 80)
        );
        assert_eq!(by_id["c"].listed_by, vec![Source::OperatorSocket]);
        assert_eq!(by_id["r"].datapath, Datapath::Routed);
    }

    #[test]
    fn a_draining_agents_session_is_not_merged_with_the_successors() {
        let mut drained = session("a", Source::PinnedSessions, Datapath::Ebpf, (1, 1));
        drained.draining_agent_pid = Some(42);
        let own = session("a", Source::OperatorSocket, Datapath::Userspace, (2, 2));
        assert_eq!(merge(vec![vec![drained], vec![own]]).len(), 2);
    }

    #[test]
    fn rates_come_from_the_same_session_in_the_earlier_reading() {
        let start = Instant::now();
        let earlier = merge(vec![vec![
            session("a", Source::OperatorSocket, Datapath::Userspace, (1000, 0)),
            session("gone", Source::RoutedFlows, Datapath::Routed, (5, 5)),
        ]]);
        let mut now = merge(vec![vec![
            session(
                "a",
                Source::OperatorSocket,
                Datapath::Userspace,
                (3000, 500),
            ),
            session("new", Source::RoutedFlows, Datapath::Routed, (9, 9)),
        ]]);
        set_rates(
            &mut now,
            Some((&earlier, start)),
            start + Duration::from_secs(2),
        );
        let a = now.iter().find(|r| r.session_id == "a").expect("a");
        assert_eq!(a.rate_up_bytes_per_second, Some(1000.0));
        assert_eq!(a.rate_down_bytes_per_second, Some(250.0));
        let new = now.iter().find(|r| r.session_id == "new").expect("new");
        assert!(new.rate_up_bytes_per_second.is_none());
    }
}
