//! Backpressure on the kernel path.
//!
//! The splice has none of its own: each redirected skb is queued for the
//! peer socket whether or not the peer can send it, and the source socket's
//! receive window reopens at once. So the agent watches each direction's
//! backlog (bytes redirected but not yet handed to the peer's TCP) and,
//! when it exceeds `agent.splice_queue_limit`, switches that direction to
//! pass mode: the verdict leaves the source's bytes on the source socket,
//! charged to its receive buffer, so TCP's window closes and the sender is
//! held back. Once every redirected byte has reached the peer, a [`Lane`]
//! copies the direction in user space, in order. Whenever the lane has
//! emptied the source's queue and written everything it read, the agent
//! offers the direction back (`MODE_RESUME`); the verdict program takes it
//! at the next skb if no byte was passed since.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::dir::{Dir, PerDir};

/// A socket the session owns, registered with the runtime by number.
pub(super) struct FdRef(RawFd);

/// Registers a session socket with the runtime for both directions of
/// readiness; both lanes share one registration per socket (epoll takes
/// each socket once).
pub(super) fn register(fd: BorrowedFd<'_>) -> io::Result<Arc<AsyncFd<FdRef>>> {
    // SAFETY: the session owns the socket and drops every clone of this
    // registration (its lanes and its own) before it closes the socket.
    let registered = unsafe {
        AsyncFd::register_with_interest(
            FdRef(fd.as_raw_fd()),
            Interest::READABLE | Interest::WRITABLE,
        )
    };
    registered.map(Arc::new).map_err(|e| e.into_parts().1)
}

impl AsRawFd for FdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Bytes moved per step.
const LANE_BUFFER: usize = 64 * 1024;
/// How long a lane waits before reading again after an early EOF.
const EOF_RECHECK: Duration = Duration::from_millis(1);

/// What one step of a lane did.
pub(super) enum LaneStep {
    Moved,
    /// The source reached EOF and everything read was written.
    Eof,
    Failed(Leg, io::Error),
}

/// The socket of a lane that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Leg {
    /// The socket the lane reads from.
    Source,
    /// The socket the lane writes to.
    Dest,
}

/// One direction copied by the agent.
pub(super) struct Lane {
    source: Arc<AsyncFd<FdRef>>,
    dest: Arc<AsyncFd<FdRef>>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The last read took less than the buffer: the queue was empty then.
    emptied: bool,
    /// Wait a moment before the next read: it returned EOF while bytes
    /// were still on their way (see `Session::on_lane_eof`).
    pause: bool,
    pub copied: u64,
}

impl Lane {
    /// A lane from `source` to `dest` (see [`register`]).
    pub fn new(source: Arc<AsyncFd<FdRef>>, dest: Arc<AsyncFd<FdRef>>) -> Self {
        Self {
            source,
            dest,
            buf: vec![0u8; LANE_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            emptied: false,
            pause: false,
            copied: 0,
        }
    }

    /// Whether the last read emptied the source's queue and everything read
    /// has been written: the moment to offer the direction back to the
    /// kernel. (Offering it after every write would cost a map update per
    /// buffer while a fast sender keeps the queue full.)
    pub fn caught_up(&self) -> bool {
        self.emptied && self.start == self.end
    }

    /// Bytes read and not yet written.
    pub fn holds_bytes(&self) -> bool {
        self.start < self.end
    }

    /// Makes the next step wait briefly before it reads.
    pub fn read_again_later(&mut self) {
        self.pause = true;
    }

    /// Moves one buffer's worth. Cancel-safe: progress lives in `self`.
    pub async fn step(&mut self) -> LaneStep {
        if self.pause {
            tokio::time::sleep(EOF_RECHECK).await;
            self.pause = false;
        }
        loop {
            if self.start < self.end {
                let mut guard = match self.dest.writable().await {
                    Ok(guard) => guard,
                    Err(e) => return LaneStep::Failed(Leg::Dest, e),
                };
                let chunk = &self.buf[self.start..self.end];
                match guard.try_io(|fd| send(fd.get_ref().0, chunk)) {
                    Ok(Ok(n)) => {
                        self.start += n;
                        self.copied += n as u64;
                        if self.start == self.end {
                            (self.start, self.end) = (0, 0);
                            return self.probe();
                        }
                        return LaneStep::Moved;
                    }
                    Ok(Err(e)) => return LaneStep::Failed(Leg::Dest, e),
                    Err(_would_block) => {}
                }
            } else {
                let mut guard = match self.source.readable().await {
                    Ok(guard) => guard,
                    Err(e) => return LaneStep::Failed(Leg::Source, e),
                };
                let buf = &mut self.buf;
                match guard.try_io(|fd| recv(fd.get_ref().0, buf)) {
                    Ok(Ok(0)) => return LaneStep::Eof,
                    Ok(Ok(n)) => {
                        (self.start, self.end) = (0, n);
                        self.emptied = n < self.buf.len();
                        return LaneStep::Moved;
                    }
                    Ok(Err(e)) => return LaneStep::Failed(Leg::Source, e),
                    Err(_would_block) => {}
                }
            }
        }
    }
}

impl Lane {
    /// Everything read has been written: looks at the source's queue at
    /// once. Whether the last read emptied it says little once the write
    /// took a while (a fast sender refills the queue meanwhile, and the
    /// offer to hand the direction back then fails); found empty now, the
    /// offer follows within a few microseconds and usually wins.
    fn probe(&mut self) -> LaneStep {
        match recv(self.source.get_ref().0, &mut self.buf) {
            Ok(0) => LaneStep::Eof,
            Ok(n) => {
                (self.start, self.end) = (0, n);
                self.emptied = false;
                LaneStep::Moved
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.emptied = true;
                LaneStep::Moved
            }
            Err(e) => LaneStep::Failed(Leg::Source, e),
        }
    }
}

fn send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `bytes`, which outlives the call.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// When to look at the backlogs next: soon enough that a fast sender cannot
/// run far past the limit, rarely when nothing moves.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueWatch {
    /// Kernel bytes of each direction at the last look.
    last: PerDir<u64>,
    at: Instant,
    /// The wake-up threshold last armed per direction (`u64::MAX`: none).
    pub armed: PerDir<u64>,
}

impl QueueWatch {
    pub fn new(now: Instant) -> Self {
        Self {
            last: PerDir::default(),
            at: now,
            armed: PerDir::new(u64::MAX, u64::MAX),
        }
    }

    /// Whether direction `dir` moved since the last look.
    pub fn moved(&self, dir: Dir, kernel_bytes: u64) -> bool {
        kernel_bytes != self.last[dir]
    }

    /// Records a look; returns the delay until the next one. `headroom`:
    /// bytes each direction may still grow before reaching the limit.
    pub fn record(
        &mut self,
        kernel_bytes: PerDir<u64>,
        headroom: PerDir<u64>,
        now: Instant,
    ) -> Duration {
        let elapsed = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let mut next = Duration::from_secs(1);
        for dir in Dir::ALL {
            let rate = kernel_bytes[dir].saturating_sub(self.last[dir]) as f64 / elapsed;
            if rate > 0.0 {
                // Half the time the current rate needs to use up the headroom.
                next = next.min(Duration::from_secs_f64(headroom[dir] as f64 / rate / 2.0));
            }
        }
        self.last = kernel_bytes;
        self.at = now;
        next.clamp(Duration::from_millis(5), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_sessions_are_looked_at_once_a_second() {
        let t0 = Instant::now();
        let mut watch = QueueWatch::new(t0);
        assert_eq!(
            watch.record(
                PerDir::new(0, 0),
                PerDir::new(16 << 20, 16 << 20),
                t0 + Duration::from_secs(1)
            ),
            Duration::from_secs(1)
        );
        assert!(!watch.moved(Dir::Up, 0));
    }

    #[test]
    fn fast_directions_are_looked_at_before_they_can_pass_the_limit() {
        let t0 = Instant::now();
        let mut watch = QueueWatch::new(t0);
        // 100 MB in 250 ms with 16 MiB of headroom: about 20 ms to the limit.
        let next = watch.record(
            PerDir::new(100_000_000, 0),
            PerDir::new(16 << 20, 16 << 20),
            t0 + Duration::from_millis(250),
        );
        assert!(
            next < Duration::from_millis(30) && next >= Duration::from_millis(5),
            "{next:?}"
        );
        assert!(watch.moved(Dir::Up, 100_000_001));
        // No headroom left: as soon as allowed.
        let next = watch.record(
            PerDir::new(200_000_000, 0),
            PerDir::new(0, 16 << 20),
            t0 + Duration::from_millis(500),
        );
        assert_eq!(next, Duration::from_millis(5));
    }
}
