//! One direction of the agent's own copy, and the budget that ends the
//! copy of a session the kernel takes over (`agent.splice_after_bytes`).

use std::future::poll_fn;
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;

/// Size of the buffer a direction borrows for one burst.
const BURST_BUFFER: usize = 64 * 1024;
/// Once the budget is spent, a read offers room for all that is queued
/// plus this, so that it empties the queue (a read shorter than its room
/// took every queued byte, so no skb is left partly read) even while the
/// sender goes on.
const DRAIN_SLACK: usize = 64 * 1024;
/// The largest such read: above the kernel's default receive buffer limit
/// (`tcp_rmem` max, 6 MiB), so one read can empty any default queue.
const DRAIN_MAX: usize = 8 << 20;

/// Bytes written so far, by direction; read by the operator endpoint.
#[derive(Default)]
pub(super) struct LiveCounters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl LiveCounters {
    fn total(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }
}

/// A direction of the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Way {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

impl Way {
    const fn index(self) -> usize {
        match self {
            Self::Up => 0,
            Self::Down => 1,
        }
    }

    const fn other(self) -> Self {
        match self {
            Self::Up => Self::Down,
            Self::Down => Self::Up,
        }
    }
}

/// Ends the copy once both directions together have written `limit`
/// bytes, at a point where neither holds a byte it read and has not
/// written: then both sockets can go to the kernel as they are.
pub(super) struct Budget<'a> {
    limit: u64,
    live: &'a LiveCounters,
    /// A direction holds bytes it read and has not written yet.
    busy: [AtomicBool; 2],
}

impl<'a> Budget<'a> {
    pub fn new(limit: u64, live: &'a LiveCounters) -> Self {
        Self {
            limit,
            live,
            busy: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }

    fn spent(&self) -> bool {
        self.live.total() >= self.limit
    }

    /// Whether `way` stops here: the budget is spent and the other
    /// direction holds nothing (else it goes on copying, so that neither
    /// direction waits for the other to be read).
    fn stops(&self, way: Way) -> bool {
        self.spent() && !self.busy[way.other().index()].load(Ordering::Relaxed)
    }

    fn set_busy(&self, way: Way, busy: bool) {
        self.busy[way.index()].store(busy, Ordering::Relaxed);
    }
}

/// How one direction's copy ended.
pub(super) enum HalfEnd {
    /// EOF from the source, and the FIN passed on to the destination.
    Eof,
    /// The budget is spent and this direction holds nothing.
    Spent,
    Error(&'static str, std::io::Error),
}

/// One direction's relay state, kept outside the copy future: dropping
/// that future at any await (a handover) loses no byte and writes none
/// twice, because every await in it is cancel-safe and this state is
/// updated right after each read and each write.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfState {
    /// Bytes read from the source and not yet written to the destination.
    #[serde(default)]
    pub pending: Vec<u8>,
    /// The source reached EOF and the destination was shut down for
    /// writing: nothing more goes this way.
    #[serde(default)]
    pub closed: bool,
    /// Bytes written to the destination so far (across agents).
    #[serde(default)]
    pub bytes: u64,
    /// Bytes of `pending` already written (0 once handed over).
    #[serde(skip)]
    pub(super) written: usize,
}

impl HalfState {
    /// What is left to write, for a successor.
    pub(super) fn handed(mut self) -> Self {
        self.pending.drain(..self.written);
        self.written = 0;
        self.pending.shrink_to_fit();
        self
    }
}

/// Writes what is pending; `Err` names the failure.
async fn flush(
    to: &mut (impl AsyncWrite + Unpin),
    half: &mut HalfState,
    count: &AtomicU64,
    stall_timeout: Duration,
) -> std::io::Result<()> {
    while half.written < half.pending.len() {
        // A slow reader takes each write well within the limit; a stalled
        // one (a zero window that never opens) does not.
        match tokio::time::timeout(stall_timeout, to.write(&half.pending[half.written..])).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => {
                half.written += n;
                half.bytes += n as u64;
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "stopped reading: no progress for {}s",
                        stall_timeout.as_secs()
                    ),
                ));
            }
        }
    }
    half.pending.clear();
    half.written = 0;
    Ok(())
}

/// Where a direction copies from and to, and what it may spend.
pub(super) struct Half<'s, 'b> {
    pub way: Way,
    pub from: ReadHalf<'s>,
    pub to: tokio::net::tcp::WriteHalf<'s>,
    pub count: &'b AtomicU64,
    pub budget: Option<&'b Budget<'b>>,
    pub stall_timeout: Duration,
}

impl Half<'_, '_> {
    fn names(&self) -> (&'static str, &'static str) {
        match self.way {
            Way::Up => ("client", "upstream"),
            Way::Down => ("upstream", "client"),
        }
    }

    fn stops(&self) -> bool {
        self.budget.is_some_and(|b| b.stops(self.way))
    }

    /// The room the next read offers: a burst, or once the budget is
    /// spent, enough to empty the source's queue in one read.
    fn read_size(&self) -> usize {
        if !self.budget.is_some_and(Budget::spent) {
            return BURST_BUFFER;
        }
        let stream: &tokio::net::TcpStream = self.from.as_ref();
        let queued = crate::sockopt::queued_bytes(stream.as_fd()).unwrap_or(0);
        usize::try_from(queued)
            .unwrap_or(DRAIN_MAX)
            .saturating_add(DRAIN_SLACK)
            .min(DRAIN_MAX)
    }

    fn set_busy(&self, busy: bool) {
        if let Some(budget) = self.budget {
            budget.set_busy(self.way, busy);
        }
    }

    /// Copies until the source's EOF, an error, or the budget stops it.
    /// Its state lives in `half`, so a handover may drop this future at
    /// any await: what was read and not yet written is still in
    /// `half.pending[half.written..]`.
    pub async fn copy(&mut self, half: &mut HalfState) -> HalfEnd {
        let names = self.names();
        // The last read took every queued byte: a short read, or none.
        let mut drained = false;
        loop {
            // First what a predecessor (or the last read) left unwritten.
            if let Err(e) = flush(&mut self.to, half, self.count, self.stall_timeout).await {
                return HalfEnd::Error(names.1, e);
            }
            self.set_busy(false);
            if half.closed {
                return HalfEnd::Eof;
            }
            // Only where no skb is partly read may the budget stop this
            // direction: the kernel path would hand such an skb to the
            // verdict whole, and the bytes already copied would go twice.
            if drained && self.stops() {
                return HalfEnd::Spent;
            }
            let size = self.read_size();
            if half.pending.capacity() < size {
                half.pending.reserve_exact(size);
            }
            let room = half.pending.capacity() - half.pending.len();
            match self.from.try_read_buf(&mut half.pending) {
                Ok(0) => {
                    half.closed = true;
                    return match self.to.shutdown().await {
                        Ok(()) => HalfEnd::Eof,
                        Err(e) => HalfEnd::Error(names.1, e),
                    };
                }
                Ok(n) => {
                    drained = n < room;
                    self.set_busy(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Idle: no buffer held while waiting. (tokio answers
                    // this without a read only after a read found nothing.)
                    drained = true;
                    half.pending = Vec::new();
                    match self.idle().await {
                        Ok(true) => {}
                        Ok(false) => return HalfEnd::Spent,
                        Err(e) => return HalfEnd::Error(names.0, e),
                    }
                }
                Err(e) => return HalfEnd::Error(names.0, e),
            }
        }
    }

    /// Waits for the source to be readable (`true`), or for the budget to
    /// stop this idle direction (`false`): the other direction's copy
    /// polls this one again whenever it makes progress.
    async fn idle(&self) -> std::io::Result<bool> {
        let stream: &tokio::net::TcpStream = self.from.as_ref();
        poll_fn(|cx| {
            if self.stops() {
                return Poll::Ready(Ok(false));
            }
            stream.poll_read_ready(cx).map_ok(|()| true)
        })
        .await
    }
}
