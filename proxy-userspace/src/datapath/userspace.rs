//! The fallback data path: the agent copies bytes itself.
//!
//! Used with `--datapath userspace`, or automatically when eBPF cannot load.
//! A session holds no buffer while idle: each direction waits for
//! readiness, borrows a buffer for one burst of reads and writes, and gives
//! it back.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proxy_common::session::DirectionCounters;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::{EndReason, SessionMeta, SpliceOutcome, StopSignal};
use crate::sockopt;

/// Size of the buffer a direction borrows for one burst.
const BURST_BUFFER: usize = 64 * 1024;

#[derive(Default)]
struct LiveCounters {
    up: AtomicU64,
    down: AtomicU64,
}

/// Sessions copied by the agent.
pub struct UserspaceDatapath {
    live: Mutex<HashMap<u64, Arc<LiveCounters>>>,
    /// A write that makes no progress this long means the reader stalled.
    stall_timeout: Duration,
}

fn counters(bytes: u64) -> DirectionCounters {
    DirectionCounters {
        userspace_bytes: bytes,
        ..DirectionCounters::default()
    }
}

/// How one direction ended.
enum HalfEnd {
    /// EOF from the source, and the FIN passed on to the destination.
    Eof,
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
    written: usize,
}

/// Both directions of a relay: what a successor needs to go on where this
/// agent stopped.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayState {
    /// Client to upstream.
    pub up: HalfState,
    /// Upstream to client.
    pub down: HalfState,
}

/// A relay stopped at a write boundary for a successor: its sockets,
/// untouched, and its state.
#[derive(Debug)]
pub struct Parked {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub relay: RelayState,
}

/// How a relay ended: the session is over, or it was parked for a
/// successor ([`EndReason::HandedOver`]).
#[derive(Debug)]
pub enum Relayed {
    Ended(SpliceOutcome),
    Parked(Box<Parked>),
}

impl HalfState {
    /// What is left to write, for a successor.
    fn handed(mut self) -> Self {
        self.pending.drain(..self.written);
        self.written = 0;
        self.pending.shrink_to_fit();
        self
    }
}

/// Writes what is pending; `Err` names the failure.
async fn flush(
    to: &mut WriteHalf<'_>,
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

/// Copies one direction until it ends. Its state lives in `half`, so a
/// handover may drop this future at any await: what was read and not yet
/// written is still in `half.pending[half.written..]`.
async fn copy_direction(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    half: &mut HalfState,
    count: &AtomicU64,
    names: (&'static str, &'static str),
    stall_timeout: Duration,
) -> HalfEnd {
    loop {
        // First what a predecessor (or the last read) left unwritten.
        if let Err(e) = flush(to, half, count, stall_timeout).await {
            return HalfEnd::Error(names.1, e);
        }
        if half.closed {
            return HalfEnd::Eof;
        }
        if half.pending.capacity() == 0 {
            half.pending.reserve_exact(BURST_BUFFER);
        }
        match from.try_read_buf(&mut half.pending) {
            Ok(0) => {
                half.closed = true;
                return match to.shutdown().await {
                    Ok(()) => HalfEnd::Eof,
                    Err(e) => HalfEnd::Error(names.1, e),
                };
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Idle: no buffer held while waiting.
                half.pending = Vec::new();
                if let Err(e) = from.readable().await {
                    return HalfEnd::Error(names.0, e);
                }
            }
            Err(e) => return HalfEnd::Error(names.0, e),
        }
    }
}

impl UserspaceDatapath {
    #[must_use]
    pub fn new(stall_timeout: Duration) -> Self {
        Self {
            live: Mutex::default(),
            stall_timeout,
        }
    }

    #[must_use]
    pub fn live_counters(&self, session_id: u64) -> Option<(DirectionCounters, DirectionCounters)> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.get(&session_id).map(|c| {
            (
                counters(c.up.load(Ordering::Relaxed)),
                counters(c.down.load(Ordering::Relaxed)),
            )
        })
    }

    /// The session no longer shows live counters here: it ended or was
    /// parked for a successor.
    fn forget_live(&self, session_id: u64) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session_id);
    }

    /// Copies the session's bytes until it ends. A session parked for a
    /// successor cannot happen here (only [`Self::relay`] parks): it ends
    /// as an agent shutdown.
    pub async fn splice(
        &self,
        meta: &SessionMeta,
        client: TcpStream,
        upstream: TcpStream,
        stop: StopSignal,
    ) -> SpliceOutcome {
        match self
            .relay(meta, client, upstream, stop, RelayState::default())
            .await
        {
            Relayed::Ended(outcome) => outcome,
            Relayed::Parked(parked) => {
                let _ = sockopt::set_linger_zero(parked.client.as_fd());
                let _ = sockopt::set_linger_zero(parked.upstream.as_fd());
                SpliceOutcome {
                    reason: EndReason::AgentShutdown,
                    detail: Some("parked without a successor".into()),
                    up: counters(parked.relay.up.bytes),
                    down: counters(parked.relay.down.bytes),
                    queued_at_splice: None,
                    datapath: super::DatapathKind::Userspace,
                }
            }
        }
    }

    /// Copies the session's bytes from `state` on (a fresh session, or one
    /// a predecessor parked) until it ends, or until it is stopped with
    /// [`EndReason::HandedOver`]: then it parks at a write boundary and
    /// gives back both sockets untouched.
    pub async fn relay(
        &self,
        meta: &SessionMeta,
        mut client: TcpStream,
        mut upstream: TcpStream,
        stop: StopSignal,
        mut state: RelayState,
    ) -> Relayed {
        let live = Arc::new(LiveCounters {
            up: AtomicU64::new(state.up.bytes),
            down: AtomicU64::new(state.down.bytes),
        });
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(meta.id, Arc::clone(&live));
        let deadline = meta.expires.map(|at| {
            tokio::time::Instant::now()
                + at.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default()
        });
        let result = {
            let (mut client_read, mut client_write) = client.split();
            let (mut upstream_read, mut upstream_write) = upstream.split();
            let up = copy_direction(
                &mut client_read,
                &mut upstream_write,
                &mut state.up,
                &live.up,
                ("client", "upstream"),
                self.stall_timeout,
            );
            let down = copy_direction(
                &mut upstream_read,
                &mut client_write,
                &mut state.down,
                &live.down,
                ("upstream", "client"),
                self.stall_timeout,
            );
            tokio::pin!(up, down);
            let (mut up_done, mut down_done) = (false, false);
            let mut first_close = None;
            loop {
                if let Some(reason) = stop.reason() {
                    break Err((reason, format!("stopped: {}", reason.as_str())));
                }
                tokio::select! {
                    end = &mut up, if !up_done => {
                        up_done = true;
                        first_close.get_or_insert(EndReason::ClientClosed);
                        if let HalfEnd::Error(side, e) = end {
                            break Err((side_reason(side), format!("{side} socket error: {e}")));
                        }
                    }
                    end = &mut down, if !down_done => {
                        down_done = true;
                        first_close.get_or_insert(EndReason::UpstreamClosed);
                        if let HalfEnd::Error(side, e) = end {
                            break Err((side_reason(side), format!("{side} socket error: {e}")));
                        }
                    }
                    reason = stop.stopped() => {
                        break Err((reason, format!("stopped: {}", reason.as_str())));
                    }
                    () = sleep_until(deadline) => {
                        break Err((EndReason::GrantExpired, "grant expired".into()));
                    }
                }
                if up_done && down_done {
                    break Ok(first_close.unwrap_or(EndReason::ClientClosed));
                }
            }
        };
        let (reason, detail) = match result {
            Ok(reason) => (reason, None),
            Err((EndReason::HandedOver, _)) => {
                self.forget_live(meta.id);
                return Relayed::Parked(Box::new(Parked {
                    client,
                    upstream,
                    relay: RelayState {
                        up: state.up.handed(),
                        down: state.down.handed(),
                    },
                }));
            }
            Err((reason, detail)) => {
                let _ = sockopt::set_linger_zero(client.as_fd());
                let _ = sockopt::set_linger_zero(upstream.as_fd());
                (reason, Some(detail))
            }
        };
        // Close first, bookkeeping after (as on the kernel path): the peers
        // learn of the end at once, and the sessions one expiry or
        // revocation ends all close before any does its bookkeeping.
        drop((client, upstream));
        if detail.is_some() {
            tokio::task::yield_now().await;
        }
        self.forget_live(meta.id);
        Relayed::Ended(SpliceOutcome {
            reason,
            detail,
            up: counters(live.up.load(Ordering::Relaxed)),
            down: counters(live.down.load(Ordering::Relaxed)),
            queued_at_splice: None,
            datapath: super::DatapathKind::Userspace,
        })
    }
}

fn side_reason(side: &str) -> EndReason {
    if side == "client" {
        EndReason::ClientClosed
    } else {
        EndReason::UpstreamClosed
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "userspace_tests.rs"]
mod tests;
