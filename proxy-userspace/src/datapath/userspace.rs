//! The fallback data path: the agent copies bytes itself.
//!
//! Used with `--datapath userspace`, or automatically when eBPF cannot load.
//! A session holds no buffer while idle: each direction waits for
//! readiness, borrows a buffer for one burst of reads and writes, and gives
//! it back.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proxy_common::session::DirectionCounters;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

pub use super::copy::HalfState;
use super::copy::{Budget, Half, HalfEnd, LiveCounters, Way};
use super::{EndReason, SessionMeta, SpliceOutcome, StopSignal};
use crate::sockopt;

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

/// How a copy with a budget ([`UserspaceDatapath::copy_first`]) came out.
#[derive(Debug)]
pub enum CopyFirst {
    /// The session ended while the agent copied it.
    Ended(SpliceOutcome),
    /// The budget is spent: both sockets, open both ways, holding no byte
    /// the agent read and did not write, and the bytes copied each way.
    /// The session's live counters stay until [`UserspaceDatapath::forget_live`].
    Spent {
        client: TcpStream,
        upstream: TcpStream,
        copied: (u64, u64),
    },
}

/// How a copy stopped.
enum Copied {
    /// Both directions reached EOF; the reason names the first.
    Over(EndReason),
    /// Asked to stop (expiry, revocation, shutdown, handover) or failed.
    Stopped(EndReason, String),
    /// The budget is spent and both directions are open and hold nothing.
    Spent,
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

    /// The session no longer shows live counters here: it ended, was
    /// parked for a successor, or (after [`CopyFirst::Spent`]) the kernel
    /// path's session ended.
    pub fn forget_live(&self, session_id: u64) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session_id);
    }

    fn register(&self, session_id: u64, state: &RelayState) -> Arc<LiveCounters> {
        let live = Arc::new(LiveCounters {
            up: AtomicU64::new(state.up.bytes),
            down: AtomicU64::new(state.down.bytes),
        });
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session_id, Arc::clone(&live));
        live
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
            Relayed::Parked(parked) => unparked(*parked),
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
        let live = self.register(meta.id, &state);
        let sockets = (&mut client, &mut upstream);
        let copied = self
            .copy(meta, sockets, &mut state, &live, &stop, None)
            .await;
        self.end(meta, client, upstream, state, &live, copied).await
    }

    /// Copies the session's first `limit` bytes (both directions together)
    /// and gives the sockets back for the kernel path
    /// (`agent.splice_after_bytes`); a session that ends sooner ends here.
    /// A session half-closed by then is copied to its end.
    pub async fn copy_first(
        &self,
        meta: &SessionMeta,
        mut client: TcpStream,
        mut upstream: TcpStream,
        stop: &StopSignal,
        limit: u64,
    ) -> CopyFirst {
        let mut state = RelayState::default();
        let live = self.register(meta.id, &state);
        let sockets = (&mut client, &mut upstream);
        let copied = self
            .copy(meta, sockets, &mut state, &live, stop, Some(limit))
            .await;
        if let Copied::Spent = copied {
            return CopyFirst::Spent {
                client,
                upstream,
                copied: (state.up.bytes, state.down.bytes),
            };
        }
        match self.end(meta, client, upstream, state, &live, copied).await {
            Relayed::Ended(outcome) => CopyFirst::Ended(outcome),
            Relayed::Parked(parked) => CopyFirst::Ended(unparked(*parked)),
        }
    }

    /// Copies until the session ends, is stopped, or spends `limit`.
    async fn copy(
        &self,
        meta: &SessionMeta,
        (client, upstream): (&mut TcpStream, &mut TcpStream),
        state: &mut RelayState,
        live: &LiveCounters,
        stop: &StopSignal,
        mut limit: Option<u64>,
    ) -> Copied {
        let deadline = meta.expires.map(|at| {
            tokio::time::Instant::now()
                + at.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default()
        });
        let mut first_close = None;
        loop {
            let budget = limit.map(|limit| Budget::new(limit, live));
            let copied = {
                let (client_read, client_write) = client.split();
                let (upstream_read, upstream_write) = upstream.split();
                let half = |way, from, to, count| Half {
                    way,
                    from,
                    to,
                    count,
                    budget: budget.as_ref(),
                    stall_timeout: self.stall_timeout,
                };
                let mut up = half(Way::Up, client_read, upstream_write, &live.up);
                let mut down = half(Way::Down, upstream_read, client_write, &live.down);
                // Pinned here and lent to `both`: futures passed by value
                // would be kept twice in its state, for the session's life.
                let (up, down) = (up.copy(&mut state.up), down.copy(&mut state.down));
                tokio::pin!(up, down);
                both((up, down), stop, deadline, &mut first_close).await
            };
            match copied {
                // A half-closed session stays here: the kernel path takes
                // only sockets open both ways.
                Copied::Spent if state.up.closed || state.down.closed => limit = None,
                copied => return copied,
            }
        }
    }

    /// Closes or parks the sockets after a copy that did not spend its
    /// budget, and reports.
    async fn end(
        &self,
        meta: &SessionMeta,
        client: TcpStream,
        upstream: TcpStream,
        state: RelayState,
        live: &LiveCounters,
        copied: Copied,
    ) -> Relayed {
        let (reason, detail) = match copied {
            Copied::Over(reason) => (reason, None),
            // `Spent` cannot come here (`copy_first` takes it first, and a
            // copy without a budget never spends one); parked, it would
            // still lose no byte.
            Copied::Stopped(EndReason::HandedOver, _) | Copied::Spent => {
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
            Copied::Stopped(reason, detail) => {
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

/// Runs both directions' copies until both end, one fails, the session is
/// stopped or its grant expires.
async fn both(
    (mut up, mut down): (
        Pin<&mut impl Future<Output = HalfEnd>>,
        Pin<&mut impl Future<Output = HalfEnd>>,
    ),
    stop: &StopSignal,
    deadline: Option<tokio::time::Instant>,
    first_close: &mut Option<EndReason>,
) -> Copied {
    let (mut up_done, mut down_done, mut spent) = (false, false, false);
    loop {
        if let Some(reason) = stop.reason() {
            return Copied::Stopped(reason, format!("stopped: {}", reason.as_str()));
        }
        let (way, end) = tokio::select! {
            end = &mut up, if !up_done => {
                up_done = true;
                (Way::Up, end)
            }
            end = &mut down, if !down_done => {
                down_done = true;
                (Way::Down, end)
            }
            reason = stop.stopped() => {
                return Copied::Stopped(reason, format!("stopped: {}", reason.as_str()));
            }
            () = sleep_until(deadline) => {
                return Copied::Stopped(EndReason::GrantExpired, "grant expired".into());
            }
        };
        match end {
            HalfEnd::Eof => {
                first_close.get_or_insert(match way {
                    Way::Up => EndReason::ClientClosed,
                    Way::Down => EndReason::UpstreamClosed,
                });
            }
            HalfEnd::Spent => spent = true,
            HalfEnd::Error(side, e) => {
                return Copied::Stopped(side_reason(side), format!("{side} socket error: {e}"));
            }
        }
        if up_done && down_done {
            return if spent {
                Copied::Spent
            } else {
                Copied::Over(first_close.unwrap_or(EndReason::ClientClosed))
            };
        }
    }
}

/// A relay parked where no successor takes it: it ends as an agent
/// shutdown, its peers reset.
fn unparked(parked: Parked) -> SpliceOutcome {
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
