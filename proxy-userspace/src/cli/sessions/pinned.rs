//! Source 1: the pinned `sessions` map (every session of an agent with the
//! eBPF programs loaded, whichever path moves its bytes), and the maps of
//! taken-over agents still draining theirs (`draining-<pid>/`).

use std::time::SystemTime;

use proxy_common::addr::read_str;
use proxy_common::session::{DATAPATH_USERSPACE, SessionRecord};

use super::{Datapath, SessionRow, Source};
use crate::cli::view;
use crate::pinned::{PinnedError, PinnedMaps};

/// The rows of the agent's sessions and of those its predecessors drain
/// (one that just ended is skipped).
pub fn read(maps: &PinnedMaps, now: SystemTime) -> Result<Vec<SessionRow>, PinnedError> {
    let mut rows: Vec<_> = maps.sessions()?.iter().map(|r| row(None, r, now)).collect();
    for (pid, dir) in crate::drain_pins::list(maps.dir()) {
        if let Ok(sessions) = PinnedMaps::open(&dir).and_then(|m| m.sessions()) {
            rows.extend(sessions.iter().map(|r| row(Some(pid), r, now)));
        }
    }
    Ok(rows)
}

fn row(draining: Option<u32>, record: &SessionRecord, now: SystemTime) -> SessionRow {
    let started = view::unix_ns(record.started_unix_ns).unwrap_or(now);
    let mut row = SessionRow::new(
        format!("{:016x}", record.session_id),
        Source::PinnedSessions,
        if record.datapath == DATAPATH_USERSPACE {
            Datapath::Userspace
        } else {
            Datapath::Ebpf
        },
    );
    row.grant_id = (record.grant_id != 0).then(|| format!("{:016x}", record.grant_id));
    read_str(&record.subject).clone_into(&mut row.subject);
    row.client = view::socket_addr(record.client_addr, record.client_port).to_string();
    row.destination = view::socket_addr(record.dest_addr, record.dest_port).to_string();
    row.upstream = view::socket_addr(record.upstream_addr, record.upstream_port).to_string();
    row.auth = crate::datapath::auth_name(record.auth_method);
    row.set_times(now, started, view::unix_ns(record.expires_unix_ns));
    // The kernel's counters; a user-space session's record counts its
    // bytes only when it ends (the operator socket has them meanwhile).
    row.bytes_up = record.up.live_bytes();
    row.bytes_down = record.down.live_bytes();
    row.packets_up = record.up.kernel_packets;
    row.packets_down = record.down.kernel_packets;
    row.redirect_failures_up = record.up.redirect_failures;
    row.redirect_failures_down = record.down.redirect_failures;
    row.draining_agent_pid = draining;
    row
}
