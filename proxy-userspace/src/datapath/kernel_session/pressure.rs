//! The session's side of backpressure (see [`super::lane`]): watching each
//! direction's backlog, switching a direction that fell behind to pass
//! mode, and copying it once the peer holds every redirected byte.

use std::time::Instant;

use proxy_common::session::{DIRECTION_DOWN, DIRECTION_UP};

use super::lane::{Lane, LaneStep};
use super::{Ending, Mode, Session, closed_reason, side_name};
use crate::datapath::watcher::Side;
use crate::sockopt;

/// (index, source, peer) of the two directions.
const DIRECTIONS: [(usize, Side, Side); 2] = [
    (0, Side::Client, Side::Upstream),
    (1, Side::Upstream, Side::Client),
];

impl Session<'_> {
    /// Bytes the agent has written toward the peer of direction `index`.
    pub(super) fn copied_total(&self, index: usize) -> u64 {
        self.copied[index] + self.lanes[index].as_ref().map_or(0, |lane| lane.copied)
    }

    /// Bytes moved toward `peer` (redirected or copied) that its TCP has not
    /// taken yet.
    fn backlog(&self, index: usize, kernel_bytes: u64, peer: Side) -> std::io::Result<u64> {
        let handed = sockopt::bytes_sent(self.socket(peer))?;
        let moved = kernel_bytes + self.copied_total(index);
        Ok(moved.saturating_sub(handed.saturating_sub(self.baselines[1 - index])))
    }

    pub(super) fn check_queues(&mut self) -> Option<Ending> {
        let now = Instant::now();
        let limit = self.dp.timeouts.queue_limit;
        let (up, down) = self.dp.live_counters(self.id).unwrap_or_default();
        let kernel = [up.kernel_bytes, down.kernel_bytes];
        let mut headroom = [limit; 2];
        for (index, source, peer) in DIRECTIONS {
            let mode = self.dirs[index].mode;
            if mode == Mode::Copying {
                if self
                    .dp
                    .redirecting(self.cookies, [DIRECTION_UP, DIRECTION_DOWN][index])
                {
                    // The verdict took the direction back: every passed byte
                    // was copied, and the kernel redirects again.
                    if let Some(lane) = self.lanes[index].take() {
                        self.copied[index] += lane.copied;
                    }
                    self.dirs[index].mode = Mode::Kernel;
                    // A FIN that came while the lane still copied raised its
                    // (edge-triggered) event then, when it was the lane's to
                    // read; the lane is gone now, so look for it here.
                    match sockopt::tcp_state(self.socket(source)) {
                        Ok(state) if !self.dirs[index].eof && fin_received(state) => {
                            self.begin_drain(index, source);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            return Some(Ending::internal(format!("TCP_INFO: {e}")));
                        }
                    }
                }
                continue;
            }
            if mode == Mode::Kernel
                && (self.dirs[index].eof || !self.queue.moved(index, kernel[index]))
            {
                continue;
            }
            let mut kernel_bytes = kernel[index];
            if mode == Mode::Draining {
                // Taking the source's lock lets a verdict still running for
                // it finish (and count); the counters must be read after
                // that, or a last redirected skb could be overtaken.
                let _ = sockopt::tcp_state(self.socket(source));
                if let Some((up, down)) = self.dp.live_counters(self.id) {
                    kernel_bytes = [up.kernel_bytes, down.kernel_bytes][index];
                }
            }
            let backlog = match self.backlog(index, kernel_bytes, peer) {
                Ok(backlog) => backlog,
                Err(e) => {
                    return Some(Ending::internal(format!("peer state: {e}")));
                }
            };
            headroom[index] = limit.saturating_sub(backlog);
            match mode {
                Mode::Kernel if backlog > limit => {
                    if let Err(e) = self
                        .dp
                        .pass_direction(self.cookies, [DIRECTION_UP, DIRECTION_DOWN][index])
                    {
                        return Some(Ending::internal(crate::error_chain(&e)));
                    }
                    tracing::info!(
                        session = %format_args!("{:016x}", self.id),
                        behind = backlog,
                        "{} cannot keep up; its bytes now wait in the {} socket (backpressure), copied by the agent",
                        side_name(peer),
                        side_name(source)
                    );
                    self.dirs[index].mode = Mode::Draining;
                    self.queue.armed[index] = u64::MAX;
                    headroom[index] = 0;
                }
                Mode::Draining if backlog == 0 => {
                    let (source_fd, peer_fd) =
                        match (self.registration(source), self.registration(peer)) {
                            (Ok(s), Ok(p)) => (s, p),
                            (Err(e), _) | (_, Err(e)) => {
                                return Some(Ending::internal(format!("cannot copy: {e}")));
                            }
                        };
                    self.lanes[index] = Some(Lane::new(source_fd, peer_fd));
                    self.dirs[index].mode = Mode::Copying;
                }
                _ => {}
            }
        }
        if let Some(ending) = self.arm_wakeups(kernel, headroom) {
            return Some(ending);
        }
        let mut next = self.queue.record(kernel, headroom, now);
        if self.dirs.iter().any(|d| d.mode != Mode::Kernel) {
            // The peer is working through its backlog, or the verdict may
            // hand a copied direction back: look again soon.
            next = next.min(std::time::Duration::from_millis(20));
        }
        self.queue_at = tokio::time::Instant::now() + next;
        None
    }

    /// Asks the verdict to wake the agent when a redirected direction has
    /// used half its headroom, so a burst after an idle spell meets the
    /// limit as soon as a busy stream does (the timer alone waits up to a
    /// second for an idle session).
    fn arm_wakeups(&mut self, kernel: [u64; 2], headroom: [u64; 2]) -> Option<Ending> {
        for (index, _, _) in DIRECTIONS {
            if self.dirs[index].mode != Mode::Kernel || self.dirs[index].eof {
                continue;
            }
            let at = kernel[index] + (headroom[index] / 2).max(64 * 1024);
            if self.queue.armed[index] == at {
                continue;
            }
            let direction = [DIRECTION_UP, DIRECTION_DOWN][index];
            if let Err(e) = self.dp.arm_wake(self.cookies, direction, at) {
                return Some(Ending::internal(crate::error_chain(&e)));
            }
            self.queue.armed[index] = at;
        }
        None
    }

    /// The runtime registration of one socket, made on first use.
    fn registration(
        &mut self,
        side: Side,
    ) -> std::io::Result<std::sync::Arc<tokio::io::unix::AsyncFd<super::lane::FdRef>>> {
        let index = usize::from(side == Side::Upstream);
        if let Some(registered) = &self.registered[index] {
            return Ok(std::sync::Arc::clone(registered));
        }
        let registered = super::lane::register(self.socket(side))?;
        self.registered[index] = Some(std::sync::Arc::clone(&registered));
        Ok(registered)
    }

    pub(super) fn on_lane(&mut self, index: usize, step: LaneStep) -> Option<Ending> {
        let (_, source, peer) = DIRECTIONS[index];
        match step {
            LaneStep::Moved => {
                // Caught up: let the verdict take over as soon as nothing
                // passed is left to copy.
                let resume_at = self.lanes[index]
                    .as_ref()
                    .filter(|l| l.caught_up())
                    .map(|_| self.copied_total(index));
                if let Some(resume_at) = resume_at {
                    let direction = [DIRECTION_UP, DIRECTION_DOWN][index];
                    if let Err(e) = self.dp.resume_direction(self.cookies, direction, resume_at) {
                        return Some(Ending::internal(crate::error_chain(&e)));
                    }
                }
                None
            }
            LaneStep::Eof => self.on_lane_eof(index, source),
            LaneStep::Failed(source_failed, e) => {
                let failed = if source_failed { source } else { peer };
                let reason = *self.first_close.get_or_insert(closed_reason(failed));
                Some(Ending::Abort(
                    reason,
                    format!("{} socket error: {e}", side_name(failed)),
                ))
            }
        }
    }

    /// The lane read the source's EOF. Two things may still be in flight:
    /// bytes the verdict passed that have not reached the socket's queue yet
    /// (the psock's backlog queues them behind bytes redirected to this
    /// socket), and, if the verdict took the direction back at its last skb,
    /// bytes redirected toward the peer. So the lane reads on until it has
    /// every passed byte, and the peer is shut down only through the drain
    /// barrier, which counts both paths.
    fn on_lane_eof(&mut self, index: usize, source: Side) -> Option<Ending> {
        // Taking the source's lock lets a verdict still running for it
        // finish (and count) before the counters are read.
        if let Err(e) = sockopt::tcp_state(self.socket(source)) {
            return Some(Ending::internal(format!("TCP_INFO: {e}")));
        }
        let passed = self.live(index).passed_bytes;
        let missing = passed.saturating_sub(self.copied_total(index));
        if missing > 0 {
            let now = Instant::now();
            let since = *self.dirs[index].eof_short_since.get_or_insert(now);
            if now.duration_since(since) > self.dp.timeouts.drain {
                return Some(Ending::Abort(
                    closed_reason(source),
                    format!(
                        "{missing} bytes held back from the {} never became readable within {:?}",
                        side_name(source),
                        self.dp.timeouts.drain
                    ),
                ));
            }
            if let Some(lane) = self.lanes[index].as_mut() {
                lane.read_again_later();
            }
            return None;
        }
        if let Some(lane) = self.lanes[index].take() {
            self.copied[index] += lane.copied;
        }
        self.begin_drain(index, source);
        None
    }
}

/// Whether a socket in TCP state `state` has received its peer's FIN.
const fn fin_received(state: u8) -> bool {
    const TCP_TIME_WAIT: u8 = 6;
    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;
    const TCP_LAST_ACK: u8 = 9;
    const TCP_CLOSING: u8 = 11;
    matches!(
        state,
        TCP_TIME_WAIT | TCP_CLOSE | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING
    )
}
