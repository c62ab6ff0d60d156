//! Takeover: `tcpgate run --takeover` replaces a running agent without
//! refusing a connection or cutting a live session.
//!
//! The running agent waits on `agent.takeover_socket` (root or its own
//! user only). The successor connects and the two talk in turn:
//!
//! 1. successor: `hello` with its state version;
//! 2. running agent: `offer` with its version, every listening socket
//!    (SCM_RIGHTS) and the state a successor needs (the grant store, the
//!    routing it installed);
//! 3. successor: `take`; the running agent releases its namespace and pin
//!    directory locks and answers `released`;
//! 4. the successor starts on the inherited listeners (both agents now
//!    accept from the same kernel queues, so no SYN is refused), replaces
//!    the pins and the sk_lookup link in place, and sends `taken`;
//! 5. the old agent stops accepting. When the successor asked to adopt
//!    (`taken` with `adopt`: same state version, and both agents on the
//!    user-space data path), the old agent parks its user-space sessions
//!    at a write boundary and sends them in batches (`sessions`, two
//!    descriptors per session, see [`sessions`]); the successor answers
//!    each batch (`adopted`) before the next one goes, and `sessions_done`
//!    ends the exchange. A batch not acknowledged (the successor died or
//!    stalled) and those after it stay with the old agent;
//! 6. the old agent drains what it kept: its live sessions keep their
//!    sockets, maps and programs until they end, then it exits without
//!    removing anything (the pins, link and routes are the successor's
//!    now);
//! 7. the connection stays open while the old agent drains: the successor
//!    sends it every grant revoked (`revoke`), so a revocation ends the
//!    sessions draining there too.
//!
//! Kernel-path (sockmap) sessions always drain: adopting them would mean
//! handing over the pinned maps, the verdict program's counters and the
//! per-session barrier state in flight, which this build does not do.
//! Sessions still being admitted, and preamble-token sessions (their
//! one-connection grant is not part of the handed-over grants), drain too.

mod client;
mod forward;
mod server;
mod sessions;
mod wire;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::revocations::RevocationSnapshot;
use crate::cluster::record::GrantRecord;
use crate::intercept::RoutingParams;

pub use client::{Attempt, Predecessor, request};
pub use forward::{follow_revocations, forward_revocations};
pub use server::{Handover, Outcome, Waiting, listen};
pub use sessions::{BATCH, Received, adopt, hand_over_sessions};

/// Version of the handed-over state and of the pinned maps' layout. Bump
/// it whenever either changes.
pub const STATE_VERSION: u32 = 2;

/// Test-only: the state version a successor advertises instead of
/// [`STATE_VERSION`], to exercise a takeover between differing builds.
pub const STATE_VERSION_ENV: &str = "TCPGATE_TEST_TAKEOVER_STATE_VERSION";

/// Test-only: set to `offer` on the running agent, it stops answering
/// after its offer (an agent hung mid-takeover); set to `adopt` on a
/// successor, it stops answering after adopting the first batch of
/// sessions (a successor hung mid-handover); set to `ready` on a
/// successor, it takes over and then never reports ready (a successor hung
/// or dying between the two).
pub const STALL_ENV: &str = "TCPGATE_TEST_TAKEOVER_STALL";

/// The state version this build advertises.
#[must_use]
pub fn advertised_version() -> u32 {
    std::env::var(STATE_VERSION_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(STATE_VERSION)
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no agent is waiting for a successor at {}", .0.display())]
    NoAgent(std::path::PathBuf),
    #[error("cannot connect to the takeover socket {}", .path.display())]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the other agent did not answer in time (agent.takeover_timeout)")]
    Timeout,
    #[error("the other agent closed the takeover connection")]
    Closed,
    #[error("takeover socket I/O failed")]
    Io(#[source] std::io::Error),
    #[error("malformed takeover message")]
    Malformed(#[source] serde_json::Error),
    #[error("takeover message of {0} bytes is too large")]
    TooLarge(usize),
    #[error("a takeover message carried more descriptors than allowed")]
    TooManyFds,
    #[error("unexpected takeover message: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the offer names {listeners} listeners but carries {fds} descriptors")]
    FdCount { listeners: usize, fds: usize },
    #[error("a batch names {sessions} sessions but carries {fds} descriptors")]
    SessionFds { sessions: usize, fds: usize },
    #[error("cannot create the takeover socket {}", .path.display())]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a handed-over listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerRole {
    /// A `[[forward]]` listener.
    Forward,
    /// A transparent listener sk_lookup steers intercepted SYNs to.
    Intercept,
    /// The runner-facing grant API.
    Api,
    /// The operator endpoints on TCP.
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub role: ListenerRole,
    pub addr: SocketAddr,
}

/// The state handed over besides the sockets. Fields a newer build adds
/// default when an older one does not send them.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct HandedState {
    /// The interception routing the old agent installed, if any.
    #[serde(default)]
    pub routing: Option<RoutingParams>,
    /// Live source grants (the same records a fleet keeps in etcd).
    #[serde(default)]
    pub grants: Vec<GrantRecord>,
    /// Revoked identities and tokens: still refused after the takeover.
    #[serde(default)]
    pub revocations: RevocationSnapshot,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello {
        state_version: u32,
        pid: u32,
    },
    /// The listeners' descriptors come with this message, in order.
    Offer {
        state_version: u32,
        pid: u32,
        listeners: Vec<ListenerInfo>,
        state: HandedState,
    },
    Take,
    Released,
    Taken {
        /// The successor adopts live sessions: the old agent sends them
        /// (or `sessions_done` at once) before anything else.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        adopt: bool,
    },
    /// Old agent to successor: parked sessions, with each one's client
    /// and upstream descriptors, in order.
    Sessions {
        sessions: Vec<crate::session::adopt::HandedSession>,
    },
    /// Successor to old agent: the last batch is adopted.
    Adopted {
        count: usize,
    },
    /// Old agent to successor: no more sessions come.
    SessionsDone,
    /// After `taken`, successor to old agent: grant `grant` was revoked
    /// (its sessions draining there end too).
    Revoke {
        grant: u64,
    },
    /// After `taken`: a subject was revoked (its grants there, preamble
    /// ones included, end; the identity is denied like in a fleet).
    RevokeSubject(crate::gate::SubjectRevocation),
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Offer { .. } => "offer",
            Self::Take => "take",
            Self::Released => "released",
            Self::Taken { .. } => "taken",
            Self::Sessions { .. } => "sessions",
            Self::Adopted { .. } => "adopted",
            Self::SessionsDone => "sessions_done",
            Self::Revoke { .. } => "revoke",
            Self::RevokeSubject(_) => "revoke_subject",
        }
    }
}

fn unexpected(expected: &'static str, got: &Message) -> TakeoverError {
    TakeoverError::Unexpected {
        expected,
        got: got.name().to_owned(),
    }
}

/// Listening sockets by role and address: what an agent offers a
/// successor, or what it inherited from its predecessor.
#[derive(Debug, Default)]
pub struct ListenerSet {
    entries: Vec<(ListenerInfo, OwnedFd)>,
}

impl ListenerSet {
    /// Records a listener (a duplicate of its descriptor).
    pub fn record(&mut self, role: ListenerRole, addr: SocketAddr, listener: &impl AsFd) {
        match listener.as_fd().try_clone_to_owned() {
            Ok(fd) => self.entries.push((ListenerInfo { role, addr }, fd)),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot keep a listener for a successor; it will bind its own");
            }
        }
    }

    /// Takes the inherited listener for `role` at `addr`.
    pub fn take(&mut self, role: ListenerRole, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self
            .entries
            .iter()
            .position(|(info, _)| info.role == role && info.addr == addr)?;
        Some(std::net::TcpListener::from(self.entries.swap_remove(i).1))
    }

    /// Takes every inherited listener of `role`.
    pub fn take_all(&mut self, role: ListenerRole) -> Vec<std::net::TcpListener> {
        let (taken, kept) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|(info, _)| info.role == role);
        self.entries = kept;
        taken
            .into_iter()
            .map(|(_, fd)| std::net::TcpListener::from(fd))
            .collect()
    }

    fn infos(&self) -> Vec<ListenerInfo> {
        self.entries.iter().map(|(info, _)| *info).collect()
    }

    fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.entries.iter().map(|(_, fd)| fd.as_fd()).collect()
    }

    fn from_offer(listeners: Vec<ListenerInfo>, fds: Vec<OwnedFd>) -> Result<Self, TakeoverError> {
        if listeners.len() != fds.len() {
            return Err(TakeoverError::FdCount {
                listeners: listeners.len(),
                fds: fds.len(),
            });
        }
        Ok(Self {
            entries: listeners.into_iter().zip(fds).collect(),
        })
    }

    /// Listeners inherited and not used (the new configuration dropped
    /// them): closing them resets the connections in their queues.
    pub fn report_unused(&self) {
        for (info, _) in &self.entries {
            tracing::warn!(role = ?info.role, addr = %info.addr, "inherited listener not in this configuration; closing it");
        }
    }
}

/// Applies both socket timeouts.
fn set_timeouts(stream: &std::os::unix::net::UnixStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}
