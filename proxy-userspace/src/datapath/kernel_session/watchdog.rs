//! A direction under backpressure that stops making progress while it has
//! bytes to move: the agent says so, once, with what it knows.
//!
//! The stall watch ends sessions whose peer stopped reading (unacknowledged
//! bytes, no progress). Bytes held inside the bastion are not unacknowledged
//! anywhere, so a direction stuck in pass mode (waiting for the peer to take
//! its redirected bytes, or a lane that no longer reads) would only show as
//! a client that hangs. This report names the direction and its counters,
//! so such a hang can be told apart from a slow peer in the agent's log.

use std::time::{Duration, Instant};

use super::dir::Dir;
use super::{Mode, Session};
use crate::sockopt;

/// What a stuck direction looked like the last time it moved.
#[derive(Debug, Clone, Copy)]
pub(super) struct Progress {
    /// Copied, passed and handed-over bytes at the last change.
    last: (u64, u64, u64),
    since: Option<Instant>,
    reported: bool,
}

impl Progress {
    pub const fn new() -> Self {
        Self {
            last: (0, 0, 0),
            since: None,
            reported: false,
        }
    }

    /// Records a look; returns how long the direction has not moved, once,
    /// when that passed `after`.
    fn observe(
        &mut self,
        now_at: (u64, u64, u64),
        now: Instant,
        after: Duration,
    ) -> Option<Duration> {
        if self.since.is_none() || self.last != now_at {
            *self = Self {
                last: now_at,
                since: Some(now),
                reported: false,
            };
            return None;
        }
        let still = now.duration_since(self.since.unwrap_or(now));
        if self.reported || still < after {
            return None;
        }
        self.reported = true;
        Some(still)
    }

    /// The direction went back to the kernel or ended: nothing to watch.
    fn reset(&mut self) {
        *self = Self::new();
    }
}

impl Session<'_> {
    /// Reports a direction in pass mode that has had bytes to move, and
    /// moved none, for half the stall timeout, while its peer had nothing
    /// unacknowledged (so the peer is not the one holding it back). Runs at
    /// the stall watch's pace, not the backlog checks' (every 20 ms in pass
    /// mode): its bound is seconds.
    pub(super) fn watch_progress(&mut self) {
        let after = self.dp.timeouts.stall / 2;
        let now = Instant::now();
        for dir in Dir::ALL {
            if self.dirs[dir].mode == Mode::Kernel || self.dirs[dir].eof {
                self.dirs[dir].progress.reset();
                continue;
            }
            let live = self.live(dir);
            let peer = sockopt::send_state(self.socket(dir.peer())).ok();
            let handed = peer.map_or(0, sockopt::SendState::handed_to_tcp);
            let copied = self.dirs[dir].copied_total();
            let waiting = sockopt::queued_bytes(self.socket(dir.source())).unwrap_or(0);
            let backlog = self.backlog_given(dir, live.kernel_bytes, handed);
            let peer_slow = peer.is_some_and(|p| p.queued > 0);
            let idle = waiting == 0 && backlog == 0 && !self.dirs[dir].lane_holds_bytes();
            // A peer with unacknowledged bytes is the stall watch's case.
            if idle || peer_slow {
                self.dirs[dir].progress.reset();
                continue;
            }
            let Some(still) =
                self.dirs[dir]
                    .progress
                    .observe((copied, live.passed_bytes, handed), now, after)
            else {
                continue;
            };
            tracing::warn!(
                session = %format_args!("{:016x}", self.id),
                direction = ?dir,
                mode = ?self.dirs[dir].mode,
                still_ms = still.as_millis(),
                backlog,
                waiting_in_source = waiting,
                kernel_bytes = live.kernel_bytes,
                passed_bytes = live.passed_bytes,
                copied,
                redirecting = self.dp.redirecting(self.cookies, dir.wire()),
                "a direction under backpressure has bytes to move and has moved none"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_once_after_the_bound_and_again_only_after_moving() {
        let t0 = Instant::now();
        let after = Duration::from_secs(1);
        let mut p = Progress::new();
        assert_eq!(p.observe((1, 1, 1), t0, after), None);
        assert_eq!(
            p.observe((1, 1, 1), t0 + Duration::from_millis(500), after),
            None
        );
        assert_eq!(
            p.observe((1, 1, 1), t0 + Duration::from_secs(2), after),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            p.observe((1, 1, 1), t0 + Duration::from_secs(3), after),
            None
        );
        // It moved: the clock starts again.
        assert_eq!(
            p.observe((2, 1, 1), t0 + Duration::from_secs(4), after),
            None
        );
        assert_eq!(
            p.observe((2, 1, 1), t0 + Duration::from_secs(5), after),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_reset_forgets_the_wait() {
        let t0 = Instant::now();
        let after = Duration::from_secs(1);
        let mut p = Progress::new();
        p.observe((1, 1, 1), t0, after);
        p.reset();
        assert_eq!(
            p.observe((1, 1, 1), t0 + Duration::from_secs(5), after),
            None
        );
    }
}
