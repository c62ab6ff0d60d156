//! The session's side of backpressure (see [`super::lane`]): watching each
//! direction's backlog, switching a direction that fell behind to pass
//! mode, and copying it once the peer holds every redirected byte.

use std::time::Instant;

use super::dir::{Dir, PerDir};
use super::lane::{Lane, LaneStep, Leg};
use super::{Ending, Mode, Session, closed_reason, side_name};
use crate::datapath::watcher::Side;
use crate::sockopt;

impl Session<'_> {
    /// Bytes moved toward the peer of `dir` (redirected or copied) that its
    /// TCP has not taken yet.
    fn backlog(&self, dir: Dir, kernel_bytes: u64) -> Result<u64, Ending> {
        let handed = sockopt::bytes_sent(self.socket(dir.peer()))
            .map_err(|e| Ending::internal(format!("peer state: {e}")))?;
        Ok(self.backlog_given(dir, kernel_bytes, handed))
    }

    /// [`Self::backlog`] with the peer's bytes handed to TCP already read.
    pub(super) fn backlog_given(&self, dir: Dir, kernel_bytes: u64, handed: u64) -> u64 {
        let moved = kernel_bytes + self.dirs[dir].copied_total();
        moved.saturating_sub(handed.saturating_sub(self.baselines[dir.peer()]))
    }

    pub(super) fn check_queues(&mut self) -> Option<Ending> {
        let now = Instant::now();
        let limit = self.dp.timeouts.queue_limit;
        let kernel = self
            .live_all()
            .unwrap_or_default()
            .map(|counters| counters.kernel_bytes);
        let mut headroom = PerDir::new(limit, limit);
        for dir in Dir::ALL {
            let looked = match self.dirs[dir].mode {
                Mode::Kernel => self.check_redirected(dir, kernel[dir], limit),
                Mode::Draining => self.check_draining(dir, kernel[dir], limit),
                Mode::Copying => self.check_copied(dir).map(|()| None),
            };
            match looked {
                Ok(Some(left)) => headroom[dir] = left,
                Ok(None) => {}
                Err(ending) => return Some(ending),
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

    /// A direction the verdict redirects: switches it to pass mode once its
    /// backlog passes the limit. Returns its headroom, if it was looked at.
    fn check_redirected(
        &mut self,
        dir: Dir,
        kernel_bytes: u64,
        limit: u64,
    ) -> Result<Option<u64>, Ending> {
        if self.dirs[dir].eof || !self.queue.moved(dir, kernel_bytes) {
            return Ok(None);
        }
        let backlog = self.backlog(dir, kernel_bytes)?;
        if backlog <= limit {
            return Ok(Some(limit - backlog));
        }
        self.dp
            .pass_direction(self.cookies, dir.wire())
            .map_err(|e| Ending::internal(crate::error_chain(&e)))?;
        tracing::info!(
            session = %format_args!("{:016x}", self.id),
            behind = backlog,
            "{} cannot keep up; its bytes now wait in the {} socket (backpressure), copied by the agent",
            side_name(dir.peer()),
            side_name(dir.source())
        );
        self.dirs[dir].mode = Mode::Draining;
        self.queue.armed[dir] = u64::MAX;
        Ok(Some(0))
    }

    /// A direction in pass mode: starts copying it once the peer holds
    /// every redirected byte. Returns its headroom.
    fn check_draining(
        &mut self,
        dir: Dir,
        kernel_bytes: u64,
        limit: u64,
    ) -> Result<Option<u64>, Ending> {
        // Taking the source's lock lets a verdict still running for it
        // finish (and count); the counters must be read after that, or a
        // last redirected skb could be overtaken.
        let _ = sockopt::tcp_state(self.socket(dir.source()));
        let kernel_bytes = self
            .live_all()
            .map_or(kernel_bytes, |counters| counters[dir].kernel_bytes);
        let backlog = self.backlog(dir, kernel_bytes)?;
        if backlog == 0 {
            let (source_fd, peer_fd) = self
                .registration(dir.source())
                .and_then(|s| Ok((s, self.registration(dir.peer())?)))
                .map_err(|e| Ending::internal(format!("cannot copy: {e}")))?;
            self.dirs[dir].lane = Some(Lane::new(source_fd, peer_fd));
            self.dirs[dir].mode = Mode::Copying;
        }
        Ok(Some(limit.saturating_sub(backlog)))
    }

    /// A direction the agent copies: notices when the verdict took it back.
    fn check_copied(&mut self, dir: Dir) -> Result<(), Ending> {
        if !self.dp.redirecting(self.cookies, dir.wire()) {
            return Ok(());
        }
        // The verdict took the direction back: every passed byte was
        // copied, and the kernel redirects again.
        self.dirs[dir].end_lane();
        self.dirs[dir].mode = Mode::Kernel;
        // A FIN that came while the lane still copied raised its
        // (edge-triggered) event then, when it was the lane's to read; the
        // lane is gone now, so look for it here.
        let state = sockopt::tcp_state(self.socket(dir.source()))
            .map_err(|e| Ending::internal(format!("TCP_INFO: {e}")))?;
        if !self.dirs[dir].eof && fin_received(state) {
            self.begin_drain(dir);
        }
        Ok(())
    }

    /// Asks the verdict to wake the agent when a redirected direction has
    /// used half its headroom, so a burst after an idle spell meets the
    /// limit as soon as a busy stream does (the timer alone waits up to a
    /// second for an idle session).
    fn arm_wakeups(&mut self, kernel: PerDir<u64>, headroom: PerDir<u64>) -> Option<Ending> {
        for dir in Dir::ALL {
            if self.dirs[dir].mode != Mode::Kernel || self.dirs[dir].eof {
                continue;
            }
            let at = kernel[dir] + (headroom[dir] / 2).max(64 * 1024);
            if self.queue.armed[dir] == at {
                continue;
            }
            if let Err(e) = self.dp.arm_wake(self.cookies, dir.wire(), at) {
                return Some(Ending::internal(crate::error_chain(&e)));
            }
            self.queue.armed[dir] = at;
        }
        None
    }

    /// The runtime registration of one socket, made on first use.
    fn registration(
        &mut self,
        side: Side,
    ) -> std::io::Result<std::sync::Arc<tokio::io::unix::AsyncFd<super::lane::FdRef>>> {
        if let Some(registered) = &self.registered[side] {
            return Ok(std::sync::Arc::clone(registered));
        }
        let registered = super::lane::register(self.socket(side))?;
        self.registered[side] = Some(std::sync::Arc::clone(&registered));
        Ok(registered)
    }

    pub(super) fn on_lane(&mut self, dir: Dir, step: LaneStep) -> Option<Ending> {
        match step {
            LaneStep::Moved => {
                // Caught up: let the verdict take over as soon as nothing
                // passed is left to copy.
                let resume_at = self.dirs[dir]
                    .lane
                    .as_ref()
                    .filter(|l| l.caught_up())
                    .map(|_| self.dirs[dir].copied_total());
                if let Some(resume_at) = resume_at
                    && let Err(e) = self
                        .dp
                        .resume_direction(self.cookies, dir.wire(), resume_at)
                {
                    return Some(Ending::internal(crate::error_chain(&e)));
                }
                None
            }
            LaneStep::Eof => self.on_lane_eof(dir),
            LaneStep::Failed(leg, e) => {
                let failed = match leg {
                    Leg::Source => dir.source(),
                    Leg::Dest => dir.peer(),
                };
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
    fn on_lane_eof(&mut self, dir: Dir) -> Option<Ending> {
        let source = dir.source();
        // Taking the source's lock lets a verdict still running for it
        // finish (and count) before the counters are read.
        if let Err(e) = sockopt::tcp_state(self.socket(source)) {
            return Some(Ending::internal(format!("TCP_INFO: {e}")));
        }
        let passed = self.live(dir).passed_bytes;
        let missing = passed.saturating_sub(self.dirs[dir].copied_total());
        if missing > 0 {
            let now = Instant::now();
            let since = *self.dirs[dir].eof_short_since.get_or_insert(now);
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
            if let Some(lane) = self.dirs[dir].lane.as_mut() {
                lane.read_again_later();
            }
            return None;
        }
        self.dirs[dir].end_lane();
        self.begin_drain(dir);
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
