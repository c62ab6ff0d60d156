//! The in-kernel data path: both sockets of a session join a SOCKHASH whose
//! `sk_skb` verdict program redirects each skb to the peer socket's egress.
//! User space writes the map entries at setup and removes them at teardown;
//! it copies no payload.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, SockHash};
use aya::programs::SkSkb;
use proxy_common::addr::{fill_str, ip_octets, unix_ns};
use proxy_common::map_names;
use proxy_common::program_names;
use proxy_common::session::{
    DATAPATH_EBPF, DATAPATH_USERSPACE, DIRECTION_DOWN, DIRECTION_UP, DirectionCounters,
    DirectionMode, MODE_PASS, MODE_REDIRECT, MODE_RESUME, SessionRecord, SocketEntry,
};

use super::SessionMeta;
use super::mode_slots::{ModeSlots, mode_index};
use super::watcher::Watcher;
use crate::bpf::{BpfError, LoadedBpf, typed};

#[derive(Debug, thiserror::Error)]
pub enum EbpfSetupError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("cannot attach the verdict program to the SOCKHASH")]
    Attach(#[source] aya::programs::ProgramError),
    #[error("cannot start the session watcher")]
    Watcher(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum SpliceSetupError {
    #[error("a socket left the ESTABLISHED state before it could join the SOCKHASH")]
    NotEstablished,
    #[error("cannot read socket state")]
    Socket(#[source] std::io::Error),
    #[error("no free slot in the DIRECTION_MODES map (more sessions than max_sessions)")]
    NoModeSlot,
    #[error("cannot update map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The session-related maps; a short lock around each syscall.
struct Maps {
    sockhash: SockHash<MapData, u64>,
    sockets: HashMap<MapData, u64, SocketEntry>,
    sessions: HashMap<MapData, u64, SessionRecord>,
    modes: Array<MapData, DirectionMode>,
    seqs: Array<MapData, u64>,
    slots: ModeSlots,
}

/// Cookies of a session's two sockets, as inserted.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cookies {
    pub client: u64,
    pub upstream: u64,
    /// The session's slot in `DIRECTION_MODES` (see [`ModeSlots`]).
    pub mode_slot: u32,
}

/// How long a session may go without progress.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// After one side's EOF, for the other direction to drain.
    pub drain: Duration,
    /// At any time, for a socket with unacknowledged data.
    pub stall: Duration,
    /// `agent.splice_sndbuf`: 0 leaves autotuning alone.
    pub sndbuf: u32,
    /// `agent.splice_queue_limit`: bytes a direction may queue in the
    /// kernel for a peer that cannot keep up before it gets backpressure.
    pub queue_limit: u64,
    /// `agent.splice_after_bytes`: bytes the agent copies itself before a
    /// session goes to the kernel; 0 splices at once.
    pub splice_after: u64,
}

pub struct EbpfDatapath {
    maps: Mutex<Maps>,
    /// For sessions the kernel cannot splice (a peer closed before setup).
    pub(super) fallback: super::userspace::UserspaceDatapath,
    pub(super) watcher: Watcher,
    pub(super) timeouts: Timeouts,
}

impl EbpfDatapath {
    /// Takes the session maps out of `bpf` and attaches the verdict program.
    /// `bpf` must outlive the data path (it owns the program link).
    pub fn attach(bpf: &mut LoadedBpf, timeouts: Timeouts) -> Result<Self, EbpfSetupError> {
        let sockhash: SockHash<MapData, u64> =
            typed(map_names::SOCKHASH, bpf.take_map(map_names::SOCKHASH)?)?;
        let sockets = typed(map_names::SOCKETS, bpf.take_map(map_names::SOCKETS)?)?;
        let sessions = typed(map_names::SESSIONS, bpf.take_map(map_names::SESSIONS)?)?;
        let modes: Array<MapData, DirectionMode> = typed(
            map_names::DIRECTION_MODES,
            bpf.take_map(map_names::DIRECTION_MODES)?,
        )?;
        let seqs: Array<MapData, u64> =
            typed(map_names::STREAM_SEQ, bpf.take_map(map_names::STREAM_SEQ)?)?;
        let slots = ModeSlots::new(modes.len());
        let wakeups: aya::maps::RingBuf<MapData> =
            typed(map_names::WAKEUPS, bpf.take_map(map_names::WAKEUPS)?)?;
        let program = bpf.load_program(program_names::VERDICT, SkSkb::load)?;
        let map_fd = sockhash.fd().try_clone().map_err(EbpfSetupError::Watcher)?;
        // The link lives in `bpf`'s program data until the object drops.
        program.attach(&map_fd).map_err(EbpfSetupError::Attach)?;
        Ok(Self {
            maps: Mutex::new(Maps {
                sockhash,
                sockets,
                sessions,
                modes,
                seqs,
                slots,
            }),
            watcher: Watcher::new(Some(wakeups)).map_err(EbpfSetupError::Watcher)?,
            fallback: super::userspace::UserspaceDatapath::new(timeouts.stall),
            timeouts,
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the session record and socket entries, then puts both sockets
    /// in the SOCKHASH. From the moment a socket is inserted, its bytes are
    /// spliced (the caller kicks the ones queued before that).
    pub(super) fn insert(
        &self,
        meta: &SessionMeta,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
    ) -> Result<Cookies, SpliceSetupError> {
        let client_cookie = crate::sockopt::cookie(client).map_err(SpliceSetupError::Socket)?;
        let upstream_cookie = crate::sockopt::cookie(upstream).map_err(SpliceSetupError::Socket)?;
        let record = session_record(meta);
        let mut maps = self.maps();
        let map_err = |map| move |source| SpliceSetupError::Map { map, source };
        let mode_slot = maps.slots.take().ok_or(SpliceSetupError::NoModeSlot)?;
        let cookies = Cookies {
            client: client_cookie,
            upstream: upstream_cookie,
            mode_slot,
        };
        // The first look comes when a direction has moved half the limit.
        let redirect = DirectionMode {
            wake_at: self.timeouts.queue_limit / 2,
            ..DirectionMode::default()
        };
        for direction in [DIRECTION_UP, DIRECTION_DOWN] {
            let index = mode_index(mode_slot, direction);
            let reset = maps
                .modes
                .set(index, redirect, 0)
                .map_err(map_err(map_names::DIRECTION_MODES))
                .and_then(|()| {
                    // No sequence number known yet: the first skb sets it.
                    maps.seqs
                        .set(index, 0, 0)
                        .map_err(map_err(map_names::STREAM_SEQ))
                });
            if let Err(e) = reset {
                maps.slots.give_back(mode_slot);
                return Err(e);
            }
        }
        if let Err(e) = maps.sessions.insert(meta.id, record, 0) {
            maps.slots.give_back(mode_slot);
            return Err(map_err(map_names::SESSIONS)(e));
        }
        let up = SocketEntry {
            peer_cookie: cookies.upstream,
            session_id: meta.id,
            direction: DIRECTION_UP,
            mode_index: mode_index(mode_slot, DIRECTION_UP),
        };
        let down = SocketEntry {
            peer_cookie: cookies.client,
            session_id: meta.id,
            direction: DIRECTION_DOWN,
            mode_index: mode_index(mode_slot, DIRECTION_DOWN),
        };
        let result = (|| {
            maps.sockets
                .insert(cookies.client, up, 0)
                .map_err(map_err(map_names::SOCKETS))?;
            maps.sockets
                .insert(cookies.upstream, down, 0)
                .map_err(map_err(map_names::SOCKETS))?;
            maps.sockhash
                .insert(cookies.upstream, upstream.as_raw_fd(), 0)
                .map_err(map_err(map_names::SOCKHASH))?;
            maps.sockhash
                .insert(cookies.client, client.as_raw_fd(), 0)
                .map_err(map_err(map_names::SOCKHASH))
        })();
        if let Err(e) = result {
            drop(maps);
            let (up, down) = self.remove(meta.id, cookies);
            // A peer's FIN can land after the caller checked both sockets:
            // the kernel then refuses the socket (EOPNOTSUPP). The session
            // can still be copied in user space, unless a verdict already
            // ran for the half-inserted pair (its bytes went nowhere safe).
            if left_established(&e) && up.redirect_failures + down.redirect_failures == 0 {
                return Err(SpliceSetupError::NotEstablished);
            }
            return Err(e);
        }
        Ok(cookies)
    }

    /// Removes a session whose sockets stay open (setup failed half-way):
    /// sockets first, so no verdict runs for them afterwards, then returns
    /// the final counters.
    pub(super) fn remove(
        &self,
        session_id: u64,
        cookies: Cookies,
    ) -> (DirectionCounters, DirectionCounters) {
        {
            let mut maps = self.maps();
            // A socket that closed has already left the SOCKHASH; not an error.
            let _ = maps.sockhash.remove(&cookies.client);
            let _ = maps.sockhash.remove(&cookies.upstream);
        }
        self.forget(session_id, cookies)
    }

    /// Switches one direction to pass mode (see [`MODE_PASS`]): the source
    /// socket's later bytes stay on it, charged to its receive buffer.
    pub(super) fn pass_direction(
        &self,
        cookies: Cookies,
        direction: u32,
    ) -> Result<(), SpliceSetupError> {
        self.set_mode(cookies, direction, not_redirecting(MODE_PASS, 0))
    }

    /// Asks the verdict to resume redirecting once the direction's passed
    /// bytes reach `resume_at` (all copied by the agent); see `MODE_RESUME`.
    pub(super) fn resume_direction(
        &self,
        cookies: Cookies,
        direction: u32,
        resume_at: u64,
    ) -> Result<(), SpliceSetupError> {
        self.set_mode(cookies, direction, not_redirecting(MODE_RESUME, resume_at))
    }

    /// Asks the verdict, for a redirected direction, to wake the agent once
    /// its redirected bytes reach `at` (see `DirectionMode::wake_at`).
    pub(super) fn arm_wake(
        &self,
        cookies: Cookies,
        direction: u32,
        at: u64,
    ) -> Result<(), SpliceSetupError> {
        let value = DirectionMode {
            mode: MODE_REDIRECT,
            wake_at: at,
            ..DirectionMode::default()
        };
        self.set_mode(cookies, direction, value)
    }

    /// Whether the verdict redirects the direction again (it switched back
    /// from `MODE_RESUME`).
    pub(super) fn redirecting(&self, cookies: Cookies, direction: u32) -> bool {
        self.maps()
            .modes
            .get(&mode_index(cookies.mode_slot, direction), 0)
            .is_ok_and(|m| m.mode == MODE_REDIRECT)
    }

    fn set_mode(
        &self,
        cookies: Cookies,
        direction: u32,
        value: DirectionMode,
    ) -> Result<(), SpliceSetupError> {
        // An array element is overwritten in place: a verdict running now
        // reads this direction's mode, old or new, never another's.
        self.maps()
            .modes
            .set(mode_index(cookies.mode_slot, direction), value, 0)
            .map_err(|source| SpliceSetupError::Map {
                map: map_names::DIRECTION_MODES,
                source,
            })
    }

    /// Lists a session the agent copies before the splice in the pinned
    /// `sessions` map (as copied: its counters stay 0 there), so that the
    /// offline views and `tcpgate revoke` see it. The splice overwrites the
    /// record; [`Self::unlist`] removes it. Best effort: a full map only
    /// hides the session from those views.
    pub(super) fn list_copied(&self, meta: &SessionMeta) {
        let mut record = session_record(meta);
        record.datapath = DATAPATH_USERSPACE;
        if let Err(e) = self.maps().sessions.insert(meta.id, record, 0) {
            tracing::debug!(error = %e, "cannot list a copied session in the pinned map");
        }
    }

    /// Takes a session's record out of the pinned map if it is still there.
    pub(super) fn unlist(&self, session_id: u64) {
        let _ = self.maps().sessions.remove(&session_id);
    }

    /// Removes the records of a session whose sockets are closed (closing
    /// already took them out of the SOCKHASH); returns the final counters.
    pub(super) fn forget(
        &self,
        session_id: u64,
        cookies: Cookies,
    ) -> (DirectionCounters, DirectionCounters) {
        let mut maps = self.maps();
        let counters = maps
            .sessions
            .get(&session_id, 0)
            .map(|r| (r.up, r.down))
            .unwrap_or_default();
        let _ = maps.sockets.remove(&cookies.client);
        let _ = maps.sockets.remove(&cookies.upstream);
        let _ = maps.sessions.remove(&session_id);
        maps.slots.give_back(cookies.mode_slot);
        counters
    }

    /// A live session's counters: the kernel's, plus what the agent
    /// copied itself before the splice or instead of it.
    #[must_use]
    pub fn live_counters(&self, session_id: u64) -> Option<(DirectionCounters, DirectionCounters)> {
        let kernel = self
            .maps()
            .sessions
            .get(&session_id, 0)
            .ok()
            .map(|r| (r.up, r.down));
        let copied = self.fallback.live_counters(session_id);
        match (kernel, copied) {
            (Some((mut up, mut down)), Some((copied_up, copied_down))) => {
                up.userspace_bytes += copied_up.userspace_bytes;
                down.userspace_bytes += copied_down.userspace_bytes;
                Some((up, down))
            }
            (kernel, copied) => kernel.or(copied),
        }
    }
}

/// A direction's mode while the agent copies it: no wake-ups (the agent
/// looks every few milliseconds anyway).
fn not_redirecting(mode: u32, resume_at: u64) -> DirectionMode {
    DirectionMode {
        mode,
        resume_at,
        wake_at: u64::MAX,
        ..DirectionMode::default()
    }
}

/// The SOCKHASH refused a socket because it is no longer ESTABLISHED.
fn left_established(error: &SpliceSetupError) -> bool {
    matches!(
        error,
        SpliceSetupError::Map {
            map: map_names::SOCKHASH,
            source: aya::maps::MapError::SyscallError(e),
        } if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP)
    )
}

/// The record operators read from the pinned `sessions` map.
#[must_use]
pub fn session_record(meta: &SessionMeta) -> SessionRecord {
    let mut record = SessionRecord::zeroed();
    record.session_id = meta.id;
    record.grant_id = meta.grant_id;
    record.started_unix_ns = unix_ns(meta.started);
    record.expires_unix_ns = meta.expires.map_or(0, unix_ns);
    record.client_addr = ip_octets(meta.client.ip());
    record.client_port = meta.client.port();
    record.dest_addr = ip_octets(meta.destination.ip());
    record.dest_port = meta.destination.port();
    record.upstream_addr = ip_octets(meta.upstream.ip());
    record.upstream_port = meta.upstream.port();
    record.auth_method = meta.auth_method;
    record.datapath = DATAPATH_EBPF;
    fill_str(&mut record.subject, &meta.subject);
    record
}
