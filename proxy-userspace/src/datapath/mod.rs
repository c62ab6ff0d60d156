//! The data path seam: once a session is authorised and its upstream is
//! connected, a [`Datapath`] moves its bytes until it ends, and reports why
//! it ended and how many bytes went each way.
//!
//! Two implementations sit behind the seam: [`ebpf::EbpfDatapath`] splices in
//! the kernel; [`userspace::UserspaceDatapath`] copies in the agent and is
//! the fallback when eBPF cannot load.

pub mod barrier;
mod copy;
pub mod ebpf;
mod kernel_session;
mod mailbox;
mod mode_slots;
mod splice_after;
mod stall;
mod stop;
pub mod userspace;
mod watcher;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use proxy_common::session::DirectionCounters;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// Which path moves a session's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    Ebpf,
    Userspace,
}

impl DatapathKind {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Userspace => "userspace",
        }
    }
}

/// Whether the agent may have read part of an skb still queued on one of
/// the session's sockets: a preamble is read to its last byte and no
/// further, a relayed greeting is cut at its limit. The kernel path hands
/// a queued skb to the verdict whole (`tcp_read_skb` does not skip what
/// an ordinary read took), so the bytes the agent read would reach the
/// peer a second time (a preamble, token and all, would reach the
/// target). The agent copies such a session's queued bytes itself before
/// the splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PartlyRead {
    /// The agent read nothing from either socket, or all that was queued.
    #[default]
    No,
    /// The agent read from a socket that still holds bytes.
    Maybe,
}

impl PartlyRead {
    /// `Maybe` when `socket` holds unread bytes (or cannot tell), right
    /// after the agent read from it.
    #[must_use]
    pub fn if_queued(socket: std::os::fd::BorrowedFd<'_>) -> Self {
        match crate::sockopt::queued_bytes(socket) {
            Ok(0) => Self::No,
            _ => Self::Maybe,
        }
    }
}

/// Why a session ended. Every session ends with exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    ClientClosed,
    UpstreamClosed,
    GrantExpired,
    Revoked,
    UpstreamUnreachable,
    AuthFailed,
    AgentShutdown,
    /// The agent itself failed (a map update, say); the detail says how.
    InternalError,
    /// Not an end: the session was parked for a successor agent, which
    /// goes on with it (see `agent::takeover`).
    HandedOver,
}

impl EndReason {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::UpstreamClosed => "upstream_closed",
            Self::GrantExpired => "grant_expired",
            Self::Revoked => "revoked",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::AuthFailed => "auth_failed",
            Self::AgentShutdown => "agent_shutdown",
            Self::InternalError => "internal_error",
            Self::HandedOver => "handed_over",
        }
    }
}

/// What the data path needs to know about a session (also what a
/// successor agent gets of it, see `session::adopt`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SessionMeta {
    pub id: u64,
    pub grant_id: u64,
    pub started: SystemTime,
    pub expires: Option<SystemTime>,
    pub client: SocketAddr,
    pub destination: SocketAddr,
    pub upstream: SocketAddr,
    /// `proxy_common::session::AUTH_*`.
    pub auth_method: u16,
    /// Shared with the session's `Admitted` (one copy per session).
    pub subject: std::sync::Arc<str>,
}

/// The name of a `SessionMeta::auth_method` (`AUTH_*`), as operators see
/// it: `none`, `preamble` or `source_grant`.
#[must_use]
pub const fn auth_name(method: u16) -> &'static str {
    match method {
        proxy_common::session::AUTH_PREAMBLE => "preamble",
        proxy_common::session::AUTH_SOURCE_GRANT => "source_grant",
        _ => "none",
    }
}

/// How a session ended.
#[derive(Debug, Clone)]
pub struct SpliceOutcome {
    pub reason: EndReason,
    pub detail: Option<String>,
    /// Client to upstream.
    pub up: DirectionCounters,
    /// Upstream to client.
    pub down: DirectionCounters,
    /// Bytes already queued on the client and upstream sockets when they
    /// joined the SOCKHASH (kernel path only): the early bytes the setup
    /// had to push through the verdict itself.
    pub queued_at_splice: Option<(u64, u64)>,
    /// The path that actually moved this session's bytes.
    pub datapath: DatapathKind,
}

pub use stop::{StopHandle, StopSignal, stop_pair};

/// The data path chosen at startup.
#[derive(Clone)]
pub enum Datapath {
    Ebpf(Arc<ebpf::EbpfDatapath>),
    Userspace(Arc<userspace::UserspaceDatapath>),
}

impl Datapath {
    #[must_use]
    pub fn kind(&self) -> DatapathKind {
        match self {
            Self::Ebpf(_) => DatapathKind::Ebpf,
            Self::Userspace(_) => DatapathKind::Userspace,
        }
    }

    /// Moves the session's bytes until it ends or (user-space path only)
    /// is parked for a successor; never panics, and closes both sockets
    /// unless it parks them. A session a predecessor parked resumes from
    /// its relay state. `partly_read`: see [`PartlyRead`].
    ///
    /// A plain function returning the path's own future, not an `async fn`:
    /// each `async fn` layer keeps its arguments for the session's whole
    /// life (about 90 bytes per live session and layer).
    pub fn relay<'a>(
        &'a self,
        meta: &'a SessionMeta,
        client: TcpStream,
        upstream: TcpStream,
        stop: StopSignal,
        state: userspace::RelayState,
        partly_read: PartlyRead,
    ) -> impl Future<Output = userspace::Relayed> + 'a {
        match self {
            Self::Ebpf(dp) => Either::Left(async move {
                userspace::Relayed::Ended(if splice_after::at_once(dp, partly_read) {
                    kernel_session::run(dp, meta, client, upstream, stop).await
                } else {
                    // Boxed: the copy's future is large, and a session
                    // spliced at once should not be sized by it.
                    let sockets = (client, upstream);
                    Box::pin(splice_after::run(dp, meta, sockets, stop)).await
                })
            }),
            // Boxed so the eBPF sessions' futures are not sized by this one.
            Self::Userspace(dp) => {
                Either::Right(Box::pin(dp.relay(meta, client, upstream, stop, state)))
            }
        }
    }

    /// Live counters of a session, if it is still running.
    #[must_use]
    pub fn live_counters(&self, session_id: u64) -> Option<(DirectionCounters, DirectionCounters)> {
        match self {
            Self::Ebpf(dp) => dp.live_counters(session_id),
            Self::Userspace(dp) => dp.live_counters(session_id),
        }
    }
}
