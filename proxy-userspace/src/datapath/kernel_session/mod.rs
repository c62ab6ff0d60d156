//! One session on the kernel path, from insertion to teardown.
//!
//! Setup order matters, and each step is there for a kernel behaviour
//! checked on our machines:
//! 1. Leave tokio's reactor (its `EPOLLIN` interest would wake the agent for
//!    every batch of spliced bytes).
//! 2. Raise `SO_RCVLOWAT` on both sockets so bytes arriving while the pair
//!    is half inserted do not trigger a verdict whose peer is missing.
//! 3. Record each socket's bytes-sent baseline for the drain barrier.
//! 4. Insert the records and both sockets.
//! 5. Lower `SO_RCVLOWAT` to 1: that re-runs the data-ready callback, so
//!    bytes queued before insertion go through the verdict now instead of
//!    waiting for the next segment. User space never reads them.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use nix::sys::epoll::EpollFlags;

mod dir;
mod drain;
mod lane;
mod pressure;
mod setup;
mod watchdog;

pub(in crate::datapath) use setup::run;

use super::barrier::{BarrierState, DrainBarrier, poll_interval};
use super::ebpf::{Cookies, EbpfDatapath};
use super::stall::StallWatch;
use super::watcher::Side;
use super::{DatapathKind, EndReason, SessionMeta, SpliceOutcome, StopSignal};
use crate::sockopt;
use dir::{Dir, PerDir, PerSide};
use lane::{Lane, LaneStep, QueueWatch};

/// The state of one direction.
struct Direction {
    mode: Mode,
    /// Copies the direction while it falls behind (`Mode::Copying`).
    lane: Option<Lane>,
    /// Bytes copied by lanes that already finished.
    copied: u64,
    /// The source side sent its FIN.
    eof: bool,
    barrier: Option<DrainBarrier>,
    /// The peer's write side has been shut down.
    shut: bool,
    /// Since when a lane has read EOF while bytes the verdict passed were
    /// still on their way to the socket's queue.
    eof_short_since: Option<Instant>,
    /// Progress while under backpressure (see [`watchdog`]).
    progress: watchdog::Progress,
}

impl Direction {
    const fn new() -> Self {
        Self {
            mode: Mode::Kernel,
            lane: None,
            copied: 0,
            eof: false,
            barrier: None,
            shut: false,
            eof_short_since: None,
            progress: watchdog::Progress::new(),
        }
    }

    /// Bytes the agent has written toward the peer.
    fn copied_total(&self) -> u64 {
        self.copied + self.lane.as_ref().map_or(0, |lane| lane.copied)
    }

    /// The lane has read bytes it has not written yet.
    fn lane_holds_bytes(&self) -> bool {
        self.lane.as_ref().is_some_and(Lane::holds_bytes)
    }

    /// Drops the lane (deregistering it), keeping the count of what it copied.
    fn end_lane(&mut self) {
        if let Some(lane) = self.lane.take() {
            self.copied += lane.copied;
        }
    }
}

fn closed_reason(side: Side) -> EndReason {
    match side {
        Side::Client => EndReason::ClientClosed,
        Side::Upstream => EndReason::UpstreamClosed,
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Client => "client",
        Side::Upstream => "upstream",
    }
}

enum Ending {
    Graceful(EndReason),
    Abort(EndReason, String),
}

impl Ending {
    /// An abort caused by the agent's own failure (a syscall or map error).
    fn internal(detail: String) -> Self {
        Self::Abort(EndReason::InternalError, detail)
    }
}

/// What woke the session up.
enum Wake {
    Stop(EndReason),
    Expired,
    Event(Option<super::watcher::SocketEvents>),
    Drain,
    StallCheck,
    QueueCheck,
    Lane(Dir, LaneStep),
}

async fn lane_step(lane: &mut Option<Lane>) -> LaneStep {
    match lane {
        Some(lane) => lane.step().await,
        None => std::future::pending().await,
    }
}

/// How a direction's bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Redirected by the verdict program.
    Kernel,
    /// Passed to the source socket (backpressure); waiting for the peer to
    /// take every byte redirected before, so order is kept.
    Draining,
    /// Copied by a [`Lane`].
    Copying,
}

struct Session<'a> {
    dp: &'a EbpfDatapath,
    id: u64,
    client: std::net::TcpStream,
    upstream: std::net::TcpStream,
    /// Each socket's bytes sent before the splice.
    baselines: PerSide<u64>,
    queued: (u64, u64),
    dirs: PerDir<Direction>,
    first_close: Option<EndReason>,
    attempt: u32,
    cookies: Cookies,
    /// Runtime registrations of the sockets, for lanes.
    registered: PerSide<Option<std::sync::Arc<tokio::io::unix::AsyncFd<lane::FdRef>>>>,
    queue: QueueWatch,
    queue_at: tokio::time::Instant,
    stalls: PerSide<StallWatch>,
}

impl<'a> Session<'a> {
    async fn watch(&mut self, meta: &SessionMeta, stop: StopSignal) -> Ending {
        let events =
            match self
                .dp
                .watcher
                .watch(self.id, self.client.as_fd(), self.upstream.as_fd())
            {
                Ok(rx) => rx,
                Err(e) => {
                    return Ending::internal(format!("cannot watch sockets: {e}"));
                }
            };
        let deadline = meta.expires.map(|at| {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::Instant::now() + left
        });
        let mut stall_tick =
            tokio::time::interval(super::stall::check_interval(self.dp.timeouts.stall));
        stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(reason) = stop.reason() {
                break Ending::Abort(reason, format!("stopped: {}", reason.as_str()));
            }
            let draining = self.dirs.iter().any(|d| d.barrier.is_some());
            let queue_at = self.queue_at;
            let PerDir { up, down } = &mut self.dirs;
            let (lane_up, lane_down) = (&mut up.lane, &mut down.lane);
            // Every branch only says what happened; the session acts on it
            // below, once the branches' futures (and their borrows) are gone.
            let wake = tokio::select! {
                reason = stop.stopped() => Wake::Stop(reason),
                () = sleep_until(deadline) => Wake::Expired,
                event = events.recv() => Wake::Event(event),
                () = tokio::time::sleep(poll_interval(self.attempt)), if draining => Wake::Drain,
                _ = stall_tick.tick() => Wake::StallCheck,
                () = tokio::time::sleep_until(queue_at) => Wake::QueueCheck,
                step = lane_step(lane_up) => Wake::Lane(Dir::Up, step),
                step = lane_step(lane_down) => Wake::Lane(Dir::Down, step),
            };
            let drain_poll = matches!(wake, Wake::Drain);
            let ending = match wake {
                Wake::Stop(reason) => Some(Ending::Abort(
                    reason,
                    format!("stopped: {}", reason.as_str()),
                )),
                Wake::Drain => None,
                Wake::Expired => Some(Ending::Abort(
                    EndReason::GrantExpired,
                    "grant expired".into(),
                )),
                Wake::Event(None) => Some(Ending::internal("session watcher stopped".into())),
                Wake::Event(Some(events)) => events
                    .raised()
                    .find_map(|(side, flags)| self.on_event(side, flags)),
                Wake::StallCheck => self.check_stalls(),
                Wake::QueueCheck => self.check_queues(),
                Wake::Lane(dir, step) => self.on_lane(dir, step),
            };
            if let Some(ending) = ending {
                break ending;
            }
            if drain_poll {
                self.attempt += 1;
            }
            if let Some(ending) = self.advance_barriers() {
                break ending;
            }
            if self.dirs.iter().all(|d| d.shut) {
                break Ending::Graceful(self.first_close.unwrap_or(EndReason::ClientClosed));
            }
        }
    }

    /// Ends the session when one socket has had unacknowledged data and no
    /// progress for the stall timeout (a peer that stopped reading); reports
    /// a direction stuck inside the bastion (see [`watchdog`]).
    fn check_stalls(&mut self) -> Option<Ending> {
        let now = Instant::now();
        let limit = self.dp.timeouts.stall;
        for side in [Side::Client, Side::Upstream] {
            let state = match sockopt::send_state(self.socket(side)) {
                Ok(state) => state,
                Err(e) => {
                    return Some(Ending::internal(format!("TCP_INFO: {e}")));
                }
            };
            if let Some(stalled) = self.stalls[side].observe(state, now, limit) {
                return Some(Ending::Abort(
                    closed_reason(side),
                    format!(
                        "{} stopped reading: {} bytes unacknowledged for {}s",
                        side_name(side),
                        state.queued,
                        stalled.as_secs()
                    ),
                ));
            }
        }
        self.watch_progress();
        None
    }

    /// The live counters of direction `dir` from the session map; zero
    /// once the record is gone.
    fn live(&self, dir: Dir) -> proxy_common::session::DirectionCounters {
        self.live_all()
            .map(|counters| counters[dir])
            .unwrap_or_default()
    }

    /// The live counters of both directions; `None` once the record is gone.
    fn live_all(&self) -> Option<PerDir<proxy_common::session::DirectionCounters>> {
        self.dp
            .live_counters(self.id)
            .map(|(up, down)| PerDir::new(up, down))
    }

    fn socket(&self, side: Side) -> BorrowedFd<'_> {
        match side {
            Side::Client => self.client.as_fd(),
            Side::Upstream => self.upstream.as_fd(),
        }
    }

    fn on_event(&mut self, side: Side, flags: EpollFlags) -> Option<Ending> {
        if flags.contains(EpollFlags::EPOLLIN) {
            // The verdict's wake-up (see the watcher): a direction is moving
            // fast; look at its backlog now.
            if let Some(ending) = self.check_queues() {
                return Some(ending);
            }
            if flags == EpollFlags::EPOLLIN {
                return None;
            }
        }
        match sockopt::take_error(self.socket(side)) {
            Ok(Some(err)) => {
                let reason = *self.first_close.get_or_insert(closed_reason(side));
                return Some(Ending::Abort(
                    reason,
                    format!("{} socket error: {err}", side_name(side)),
                ));
            }
            Err(e) => {
                return Some(Ending::internal(format!("SO_ERROR: {e}")));
            }
            Ok(None) => {}
        }
        if flags.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP) {
            let dir = Dir::from_source(side);
            // A direction the agent copies sees its EOF as a 0-byte read;
            // one handed back to the kernel meanwhile checks for it then
            // (this edge-triggered event does not come again).
            if !self.dirs[dir].eof && self.dirs[dir].mode == Mode::Kernel {
                self.begin_drain(dir);
            }
        }
        None
    }

    /// Closes both sockets: the first step of every end. The peers learn
    /// of the end at once (that is what expiry teardown latency is), and
    /// closing takes each socket out of the SOCKHASH, so no verdict runs
    /// for it after [`Closed::report`] reads the counters. It also takes
    /// both out of the watcher's epoll set; only the mailbox is left to drop.
    fn close(mut self, ending: Ending) -> Closed<'a> {
        // Deregister the copied directions before their sockets close.
        let copied = PerDir::from_fn(|dir| {
            let state = &mut self.dirs[dir];
            state.end_lane();
            state.copied
        });
        self.registered = PerSide::default();
        let (reason, detail) = match ending {
            Ending::Graceful(reason) => (reason, None),
            Ending::Abort(reason, detail) => {
                // A RST tells both peers the stream did not end cleanly.
                let _ = sockopt::set_linger_zero(self.client.as_fd());
                let _ = sockopt::set_linger_zero(self.upstream.as_fd());
                (reason, Some(detail))
            }
        };
        drop(self.client);
        drop(self.upstream);
        self.dp.watcher.forget(self.id);
        Closed {
            dp: self.dp,
            id: self.id,
            cookies: self.cookies,
            copied,
            queued: self.queued,
            reason,
            detail,
        }
    }
}

/// A session whose sockets are closed, before its bookkeeping.
struct Closed<'a> {
    dp: &'a EbpfDatapath,
    id: u64,
    cookies: Cookies,
    copied: PerDir<u64>,
    queued: (u64, u64),
    reason: EndReason,
    detail: Option<String>,
}

impl Closed<'_> {
    /// Whether the agent ended it (expiry, revocation, shutdown, a stall or
    /// an error): such ends come in batches, one timer or revocation for
    /// many sessions.
    fn aborted(&self) -> bool {
        self.detail.is_some()
    }

    /// Removes the session's map entries and reports its counters.
    fn report(self) -> SpliceOutcome {
        let (mut up, mut down) = self.dp.forget(self.id, self.cookies);
        up.userspace_bytes += self.copied.up;
        down.userspace_bytes += self.copied.down;
        SpliceOutcome {
            reason: self.reason,
            detail: self.detail,
            up,
            down,
            queued_at_splice: Some(self.queued),
            datapath: DatapathKind::Ebpf,
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
