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

async fn copy_direction(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    count: &AtomicU64,
    names: (&'static str, &'static str),
    stall_timeout: Duration,
) -> HalfEnd {
    loop {
        if let Err(e) = from.readable().await {
            return HalfEnd::Error(names.0, e);
        }
        let mut buf = vec![0u8; BURST_BUFFER];
        loop {
            match from.try_read(&mut buf) {
                Ok(0) => {
                    return match to.shutdown().await {
                        Ok(()) => HalfEnd::Eof,
                        Err(e) => HalfEnd::Error(names.1, e),
                    };
                }
                Ok(n) => {
                    // A slow reader drains one buffer well within the limit;
                    // a stalled one (a zero window that never opens) does not.
                    match tokio::time::timeout(stall_timeout, to.write_all(&buf[..n])).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return HalfEnd::Error(names.1, e),
                        Err(_) => {
                            let stalled = std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "stopped reading: no progress for {}s",
                                    stall_timeout.as_secs()
                                ),
                            );
                            return HalfEnd::Error(names.1, stalled);
                        }
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return HalfEnd::Error(names.0, e),
            }
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

    pub async fn splice(
        &self,
        meta: &SessionMeta,
        mut client: TcpStream,
        mut upstream: TcpStream,
        stop: StopSignal,
    ) -> SpliceOutcome {
        let live = Arc::new(LiveCounters::default());
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
                &live.up,
                ("client", "upstream"),
                self.stall_timeout,
            );
            let down = copy_direction(
                &mut upstream_read,
                &mut client_write,
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
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&meta.id);
        SpliceOutcome {
            reason,
            detail,
            up: counters(live.up.load(Ordering::Relaxed)),
            down: counters(live.down.load(Ordering::Relaxed)),
            queued_at_splice: None,
            datapath: super::DatapathKind::Userspace,
        }
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
