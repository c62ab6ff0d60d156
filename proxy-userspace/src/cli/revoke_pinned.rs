//! `tcpgate revoke` when the agent's API does not answer (a hung or
//! stopped agent): work from the pinned maps instead.
//!
//! 1. Flag each matching grant revoked in the pinned `grants` map, and
//!    leave the marker record that makes the agent look. The agent revokes
//!    flagged grants in its store as soon as it runs again, so they admit
//!    nothing new.
//! 2. Find the grant's sessions in the `sessions` map and their sockets'
//!    cookies in the `sockets` map. A session the agent still copies
//!    (`agent.splice_after_bytes`) has no cookies there: its client's
//!    socket is found by the addresses in its record.
//! 3. Find those cookies among this namespace's TCP sockets (sock_diag) and
//!    destroy each socket (`SOCK_DESTROY`): both peers get a RST at once.
//!
//! The flag is set before the sockets are destroyed, so the agent, when it
//! sees the aborted sockets, records the sessions as `revoked`. Needs root
//! (write access to the map, `CAP_NET_ADMIN` for the sockets) and must run
//! in the agent's network namespace.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use proxy_common::addr::fill_str;
use proxy_common::grant::GRANT_FLAG_REVOKED;
use proxy_common::session::{DATAPATH_USERSPACE, SUBJECT_LEN, SessionRecord};

use super::revoke::Target;
use super::view;
use crate::pinned::{PinnedError, PinnedMaps};
use crate::sockdiag::{self, SockDiagError};

/// Why revoking through the pinned maps stopped.
#[derive(Debug, thiserror::Error)]
enum RevokeError {
    #[error(transparent)]
    Pinned(#[from] PinnedError),
    #[error("cannot flag grant {id:016x} revoked")]
    Flag {
        id: u64,
        #[source]
        source: PinnedError,
    },
    #[error("cannot tell the agent to look")]
    Mark(#[source] PinnedError),
    #[error(transparent)]
    Sockets(#[from] SockDiagError),
}

/// Revokes in the pin directory's maps and in those of every agent
/// draining after a takeover (`<pin_dir>/draining-<pid>/`): a session
/// draining there ends too.
pub fn run(dir: &Path, target: &Target) -> i32 {
    let mut found = false;
    let mut failed = false;
    let draining = crate::drain_pins::list(dir);
    let dirs = std::iter::once(dir.to_owned()).chain(draining.into_iter().map(|(_, d)| d));
    for dir in dirs {
        match revoke(&dir, target) {
            Ok(Outcome::NotFound) => {}
            Ok(Outcome::Revoked { complete }) => {
                found = true;
                failed |= !complete;
            }
            Err(e) => {
                eprintln!(
                    "tcpgate revoke: {}: {}",
                    dir.display(),
                    crate::error_chain(&e)
                );
                failed = true;
            }
        }
    }
    if !found && !failed {
        println!(
            "no live grant matched in the pinned maps under {}",
            dir.display()
        );
    }
    i32::from(failed || !found)
}

/// What revoking in one directory's maps did.
enum Outcome {
    NotFound,
    /// `complete`: every socket of the grants' sessions was destroyed.
    Revoked {
        complete: bool,
    },
}

/// The sockets `tcpgate revoke` destroys for a grant's sessions.
struct Targets {
    found: Vec<sockdiag::DiagSocket>,
    /// How many there should be.
    expected: usize,
    /// Sessions the agent was still copying (their client's socket only).
    copied: usize,
}

/// Both sockets of a spliced session, by their cookies in the `sockets`
/// map; the client's of a session the agent still copies (it has no
/// cookies there), by the addresses in its record. The agent ends the
/// copy, upstream side included, when it sees the client's socket aborted.
fn sockets_of(maps: &PinnedMaps, sessions: &[SessionRecord]) -> Result<Targets, RevokeError> {
    let session_ids: HashSet<u64> = sessions.iter().map(|s| s.session_id).collect();
    let cookies: HashSet<u64> = maps
        .sockets()?
        .into_iter()
        .filter(|(_, entry)| session_ids.contains(&entry.session_id))
        .map(|(cookie, _)| cookie)
        .collect();
    // The client's socket on the bastion: local is the address it dialed.
    let clients: HashSet<(SocketAddr, SocketAddr)> = sessions
        .iter()
        .filter(|s| s.datapath == DATAPATH_USERSPACE)
        .map(|s| {
            (
                view::socket_addr(s.dest_addr, s.dest_port),
                view::socket_addr(s.client_addr, s.client_port),
            )
        })
        .collect();
    let mut targets = Targets {
        found: Vec::new(),
        expected: cookies.len() + clients.len(),
        copied: clients.len(),
    };
    if targets.expected > 0 {
        targets.found = sockdiag::tcp_sockets()?
            .into_iter()
            .filter(|s| cookies.contains(&s.cookie()) || clients.contains(&(s.local(), s.remote())))
            .collect();
    }
    Ok(targets)
}

fn revoke(dir: &Path, target: &Target) -> Result<Outcome, RevokeError> {
    let maps = PinnedMaps::open(dir)?;
    let grants = maps.grants()?;
    let wanted: Vec<(u64, String)> = match target {
        Target::Grant(id) => grants
            .iter()
            .filter(|g| g.grant_id == id.0)
            .map(|g| {
                (
                    g.grant_id,
                    proxy_common::addr::read_str(&g.subject).to_owned(),
                )
            })
            .collect(),
        Target::Subject(subject) => {
            // Records keep the first SUBJECT_LEN bytes of a subject.
            let mut stored = [0u8; SUBJECT_LEN];
            fill_str(&mut stored, subject);
            grants
                .iter()
                .filter(|g| g.subject == stored)
                .map(|g| (g.grant_id, subject.clone()))
                .collect()
        }
    };
    if wanted.is_empty() {
        return Ok(Outcome::NotFound);
    }
    for (id, _) in &wanted {
        maps.flag_grant(*id, GRANT_FLAG_REVOKED)
            .map_err(|source| RevokeError::Flag { id: *id, source })?;
    }
    maps.mark_revocations_pending().map_err(RevokeError::Mark)?;
    let ids: HashSet<u64> = wanted.iter().map(|(id, _)| *id).collect();
    let sessions: Vec<_> = maps
        .sessions()?
        .into_iter()
        .filter(|s| ids.contains(&s.grant_id))
        .collect();
    let Targets {
        found,
        expected,
        copied,
    } = sockets_of(&maps, &sessions)?;
    let mut destroyed = 0;
    let mut failed = 0;
    for socket in &found {
        match sockdiag::destroy(socket) {
            Ok(()) => {
                destroyed += 1;
                println!("  destroyed socket {}", socket.describe());
            }
            Err(e) => {
                failed += 1;
                eprintln!(
                    "  cannot destroy socket {}: {}",
                    socket.describe(),
                    crate::error_chain(&e)
                );
            }
        }
    }
    for (id, subject) in &wanted {
        let count = sessions.iter().filter(|s| s.grant_id == *id).count();
        println!(
            "revoked grant {id:016x} ({subject}) through the pinned map, {count} session(s) ended (in {})",
            dir.display()
        );
    }
    println!(
        "{destroyed} of {expected} socket(s) destroyed with SOCK_DESTROY; the agent applies the revocation \
         (no new connections, audit lines with reason revoked) as soon as it runs again"
    );
    if copied > 0 {
        println!(
            "{copied} of these session(s) the agent was copying itself: their client side is destroyed, \
             their upstream side closes when the agent runs again"
        );
    }
    let missing = expected.saturating_sub(found.len());
    if missing > 0 {
        eprintln!(
            "tcpgate revoke: {missing} socket(s) of these sessions are not in this network namespace: \
             run tcpgate revoke in the agent's (nsenter --net=/proc/<agent pid>/ns/net)"
        );
    }
    Ok(Outcome::Revoked {
        complete: failed == 0 && missing == 0,
    })
}
