//! The drain barrier for a half-close.
//!
//! The kernel does not relay a FIN through the splice: the agent sees EOF on
//! one socket and must shut down the peer's write side itself. Doing that at
//! once loses data, because redirected bytes may still wait in the peer's
//! psock queue. So the agent waits until the peer socket has taken every byte
//! the verdict program redirected to it (`bytes_acked + SIOCOUTQ` caught up
//! with the redirect counter) before shutting it down.

use std::time::{Duration, Instant};

/// Where a barrier stands after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierState {
    /// The peer holds every redirected byte; shut it down now.
    Done,
    /// Still draining, and progress was made within the stall limit.
    Waiting,
    /// No progress for longer than the stall limit.
    Stalled { behind: u64 },
}

/// Tracks one direction's drain after its source reached EOF.
#[derive(Debug, Clone)]
pub struct DrainBarrier {
    /// Bytes the peer socket had sent before splicing started.
    baseline: u64,
    stall_limit: Duration,
    last_sent: u64,
    last_progress: Instant,
}

impl DrainBarrier {
    #[must_use]
    pub fn new(baseline: u64, stall_limit: Duration, now: Instant) -> Self {
        Self {
            baseline,
            stall_limit,
            last_sent: baseline,
            last_progress: now,
        }
    }

    /// `sent_now`: the peer's current `bytes_acked + SIOCOUTQ`;
    /// `redirected`: bytes the verdict program redirected to the peer.
    pub fn check(&mut self, sent_now: u64, redirected: u64, now: Instant) -> BarrierState {
        let accepted = sent_now.saturating_sub(self.baseline);
        if accepted >= redirected {
            return BarrierState::Done;
        }
        if sent_now > self.last_sent {
            self.last_sent = sent_now;
            self.last_progress = now;
        }
        if now.duration_since(self.last_progress) > self.stall_limit {
            BarrierState::Stalled {
                behind: redirected - accepted,
            }
        } else {
            BarrierState::Waiting
        }
    }
}

/// Polling cadence while draining: fast at first (most drains finish within
/// a millisecond), backing off so a slow reader costs little.
#[must_use]
pub fn poll_interval(attempt: u32) -> Duration {
    Duration::from_micros(200u64 << attempt.min(8)).min(Duration::from_millis(50))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_only_when_peer_caught_up_with_redirects() {
        let t0 = Instant::now();
        let mut barrier = DrainBarrier::new(1, Duration::from_secs(5), t0);
        assert_eq!(
            barrier.check(1, 0, t0),
            BarrierState::Done,
            "nothing redirected"
        );
        assert_eq!(barrier.check(500, 1000, t0), BarrierState::Waiting);
        assert_eq!(
            barrier.check(1000, 1000, t0),
            BarrierState::Waiting,
            "baseline counts"
        );
        assert_eq!(barrier.check(1001, 1000, t0), BarrierState::Done);
    }

    #[test]
    fn stalls_only_without_progress() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(5);
        let mut barrier = DrainBarrier::new(0, limit, t0);
        assert_eq!(
            barrier.check(10, 100, t0 + Duration::from_secs(4)),
            BarrierState::Waiting
        );
        // Progress at 4 s resets the clock: 8 s is only 4 s without progress.
        assert_eq!(
            barrier.check(10, 100, t0 + Duration::from_secs(8)),
            BarrierState::Waiting
        );
        assert_eq!(
            barrier.check(10, 100, t0 + Duration::from_secs(10)),
            BarrierState::Stalled { behind: 90 }
        );
    }

    #[test]
    fn poll_interval_backs_off_and_is_capped() {
        assert_eq!(poll_interval(0), Duration::from_micros(200));
        assert!(poll_interval(3) > poll_interval(2));
        assert_eq!(poll_interval(30), Duration::from_millis(50));
    }
}
