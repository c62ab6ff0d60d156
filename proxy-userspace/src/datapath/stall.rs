//! Stall detection for spliced sessions: a peer that stops reading (a zero
//! window that never opens) keeps the kernel's zero-window probes answered,
//! so `TCP_USER_TIMEOUT` never fires. The agent watches progress instead:
//! a socket with unacknowledged data whose acknowledged count has not moved
//! for the stall timeout is stalled. A slow reader makes progress and is
//! never mistaken for one.

use std::time::{Duration, Instant};

use crate::sockopt::SendState;

/// Progress of one socket's sending side.
#[derive(Debug, Clone, Copy)]
pub struct StallWatch {
    acked: u64,
    since: Instant,
}

impl StallWatch {
    #[must_use]
    pub fn new(now: Instant) -> Self {
        Self {
            acked: 0,
            since: now,
        }
    }

    /// Records a sample; returns how long the socket has been stalled once
    /// that exceeds `limit`.
    pub fn observe(&mut self, state: SendState, now: Instant, limit: Duration) -> Option<Duration> {
        if state.queued == 0 || state.acked != self.acked {
            self.acked = state.acked;
            self.since = now;
            return None;
        }
        let stalled = now.duration_since(self.since);
        (stalled > limit).then_some(stalled)
    }
}

/// How often to sample: often enough to end a stalled session within about
/// a quarter of the limit past it, rarely enough to cost nothing.
#[must_use]
pub fn check_interval(limit: Duration) -> Duration {
    (limit / 4).clamp(Duration::from_millis(250), Duration::from_secs(15))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(acked: u64, queued: u64) -> SendState {
        SendState {
            acked,
            queued,
            tcp_state: 1,
        }
    }

    #[test]
    fn stalled_only_with_queued_data_and_no_progress() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(10);
        let mut watch = StallWatch::new(t0);
        assert_eq!(
            watch.observe(state(0, 0), t0 + Duration::from_secs(30), limit),
            None,
            "idle is not stalled"
        );
        assert_eq!(
            watch.observe(state(100, 50), t0 + Duration::from_secs(31), limit),
            None
        );
        assert_eq!(
            watch.observe(state(100, 50), t0 + Duration::from_secs(40), limit),
            None,
            "9 s"
        );
        assert_eq!(
            watch.observe(state(100, 50), t0 + Duration::from_secs(42), limit),
            Some(Duration::from_secs(11))
        );
    }

    #[test]
    fn any_progress_resets_the_clock() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(10);
        let mut watch = StallWatch::new(t0);
        watch.observe(state(100, 50), t0, limit);
        assert_eq!(
            watch.observe(state(101, 50), t0 + Duration::from_secs(9), limit),
            None
        );
        assert_eq!(
            watch.observe(state(101, 50), t0 + Duration::from_secs(18), limit),
            None,
            "9 s since progress"
        );
    }

    #[test]
    fn interval_is_bounded() {
        assert_eq!(
            check_interval(Duration::from_millis(100)),
            Duration::from_millis(250)
        );
        assert_eq!(
            check_interval(Duration::from_secs(8)),
            Duration::from_secs(2)
        );
        assert_eq!(
            check_interval(Duration::from_secs(600)),
            Duration::from_secs(15)
        );
    }
}
