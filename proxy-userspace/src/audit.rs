//! The audit log: one JSON line per session opened, session closed and
//! connection denied. Writing happens on its own task, so a slow or failing
//! disk never blocks a session.
//!
//! Session lines are never dropped: they have their own queue, unbounded
//! but fed only by admitted sessions (at most two lines each, and sessions
//! are bounded by `max_sessions`). Denial lines, which any peer can cause,
//! go through a bounded queue; when it is full they are dropped and
//! counted in `tcpgate_audit_dropped`. Strings a peer chooses (subject,
//! claims, details quoting a token's `kid`) are cut to a few hundred bytes.

mod bound;
mod claims;
mod text;

pub use bound::truncate;
pub use claims::AuditClaims;
pub use text::{socket_addr, socket_addr_v4};

use std::path::PathBuf;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Denial lines queued before new ones are dropped (and counted).
const QUEUE_DEPTH: usize = 8192;
/// Longest subject or claim value kept, in bytes.
pub const MAX_FIELD: usize = 256;
/// Longest detail kept, in bytes.
pub const MAX_DETAIL: usize = 512;

/// What happened.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    SessionOpen,
    SessionClose,
    ConnectionDenied,
}

/// One audit line. Never carries a token, only selected claims.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// RFC 3339 UTC time of the event.
    pub time: String,
    pub event: EventKind,
    /// The bastion that wrote it (`[cluster] name`), in a fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bastion: Option<std::sync::Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Shared with the grant (or the token's cache entry): a session's
    /// lines never copy them, and write the JSON made with them.
    #[serde(
        skip_serializing_if = "no_claims",
        serialize_with = "AuditClaims::serialize_line"
    )]
    pub claims: AuditClaims,
    /// The client's address and port.
    pub source: String,
    /// The address the client dialled.
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    /// Of `bytes_up`, how many the verdict program moved in the kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_bytes_down: Option<u64>,
    /// Of `bytes_up`, how many the agent copied itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub userspace_bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub userspace_bytes_down: Option<u64>,
    /// Of the user-space bytes on the kernel path, how many the verdict
    /// handed over because the peer could not keep up (backpressure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backpressure_bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backpressure_bytes_down: Option<u64>,
    /// Times the kernel took the direction back after backpressure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backpressure_handbacks_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backpressure_handbacks_down: Option<u64>,
    /// Client bytes already queued when the sockets joined the splice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_bytes_down: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why the session ended or the connection was denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// More detail on the reason, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The session outlived its agent's takeover by a successor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
}

/// What became of a live session when a successor took the agent over.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Handover {
    /// The old agent kept it until it ended; the successor never saw it.
    Drained,
    /// A successor adopted it (its sockets and relay state) and ended it.
    Adopted,
}

impl AuditEvent {
    /// An event with only the mandatory fields set.
    #[must_use]
    pub fn new(event: EventKind, source: String, destination: String) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            bastion: None,
            session_id: None,
            grant_id: None,
            subject: None,
            claims: AuditClaims::default(),
            source,
            destination,
            upstream: None,
            datapath: None,
            bytes_up: None,
            bytes_down: None,
            kernel_bytes_up: None,
            kernel_bytes_down: None,
            userspace_bytes_up: None,
            userspace_bytes_down: None,
            backpressure_bytes_up: None,
            backpressure_bytes_down: None,
            backpressure_handbacks_up: None,
            backpressure_handbacks_down: None,
            early_bytes_up: None,
            early_bytes_down: None,
            duration_ms: None,
            reason: None,
            detail: None,
            handover: None,
        }
    }
}

fn no_claims(claims: &AuditClaims) -> bool {
    claims.is_empty()
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

impl AuditTarget {
    /// `-` means standard output; anything else is a file path.
    #[must_use]
    pub fn parse(value: &str) -> Self {
        if value == "-" {
            Self::Stdout
        } else {
            Self::File(PathBuf::from(value))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

enum Message {
    /// Boxed: events are large and the flush variant is tiny.
    Event(Box<AuditEvent>),
    /// Acknowledged once every event queued before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Cheap to clone; every clone feeds the same writer task.
#[derive(Clone)]
pub struct AuditLog {
    /// Denials (and flushes): bounded.
    tx: mpsc::Sender<Message>,
    /// Session lines: never dropped.
    sessions: mpsc::UnboundedSender<Box<AuditEvent>>,
    dropped: Counter,
    /// Stamped on every line (`[cluster] name`).
    bastion: Option<std::sync::Arc<str>>,
    /// Set once a successor took over: closes are then of drained sessions.
    handed_over: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the target and spawns the writer task on the current runtime;
    /// dropped denial lines are added to `dropped`.
    pub async fn open(target: &AuditTarget, dropped: Counter) -> Result<Self, AuditError> {
        let sink: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match target {
            AuditTarget::Stdout => Box::new(tokio::io::stdout()),
            AuditTarget::File(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|source| AuditError::Open {
                        path: path.clone(),
                        source,
                    })?;
                Box::new(file)
            }
        };
        Ok(Self::with_sink(sink, dropped))
    }

    fn with_sink(sink: Box<dyn tokio::io::AsyncWrite + Send + Unpin>, dropped: Counter) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (sessions, session_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(rx, session_rx, sink));
        Self {
            tx,
            sessions,
            dropped,
            bastion: None,
            handed_over: std::sync::Arc::default(),
        }
    }

    /// A successor took over: every session closing from now on was
    /// drained here, and its close line says so.
    pub fn mark_handed_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Names this bastion on every line (a fleet's audit logs merged).
    #[must_use]
    pub fn with_bastion(mut self, name: Option<&str>) -> Self {
        self.bastion = name.map(std::sync::Arc::from);
        self
    }

    /// Queues an event without waiting. A session line always gets in; a
    /// denial line is dropped and counted if the writer is far behind.
    pub fn record(&self, mut event: AuditEvent) {
        bound::bound(&mut event);
        event.bastion.clone_from(&self.bastion);
        if event.event == EventKind::SessionClose
            && event.handover.is_none()
            && self.handed_over.load(std::sync::atomic::Ordering::Acquire)
        {
            event.handover = Some(Handover::Drained);
        }
        if event.event != EventKind::ConnectionDenied {
            // Fails only once the writer is gone (shutdown).
            let _ = self.sessions.send(Box::new(event));
            return;
        }
        if self.tx.try_send(Message::Event(Box::new(event))).is_err() {
            let dropped = self.dropped.inc() + 1;
            if dropped.is_power_of_two() {
                tracing::error!(dropped, "audit log writer is behind; denial lines dropped");
            }
        }
    }

    /// Denial lines dropped because the writer could not keep up.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Waits until every event queued so far has been written.
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

/// Bytes of lines written at once: the lines queued when the writer wakes,
/// and those the tasks already runnable then add, go out in one write (for
/// a file, one hand-off to tokio's blocking pool) instead of one each.
const MAX_BATCH: usize = 64 * 1024;

async fn write_loop(
    mut rx: mpsc::Receiver<Message>,
    mut sessions: mpsc::UnboundedReceiver<Box<AuditEvent>>,
    mut sink: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
) {
    let mut failures: u64 = 0;
    let mut batch = Vec::new();
    loop {
        let event = tokio::select! {
            // Session lines first: a flood of denials does not delay them.
            biased;
            Some(event) = sessions.recv() => event,
            message = rx.recv() => match message {
                Some(Message::Event(event)) => event,
                Some(Message::Flush(done)) => {
                    // Session lines queued before the flush are written first.
                    take_queued(&mut sessions, &mut batch, usize::MAX);
                    write_batch(&mut sink, &mut batch, &mut failures).await;
                    let _ = done.send(());
                    continue;
                }
                None => return,
            },
        };
        append_line(&mut batch, &event);
        // Lets the tasks already runnable (sessions ending in the same
        // burst) queue their lines first: one write, and for a file one
        // hand-off to the blocking pool, then carries them all.
        tokio::task::yield_now().await;
        take_queued(&mut sessions, &mut batch, MAX_BATCH);
        write_batch(&mut sink, &mut batch, &mut failures).await;
    }
}

/// Appends the session lines already queued, up to `max` bytes in all.
fn take_queued(
    sessions: &mut mpsc::UnboundedReceiver<Box<AuditEvent>>,
    batch: &mut Vec<u8>,
    max: usize,
) {
    while batch.len() < max {
        match sessions.try_recv() {
            Ok(event) => append_line(batch, &event),
            Err(_) => return,
        }
    }
}

fn append_line(batch: &mut Vec<u8>, event: &AuditEvent) {
    let start = batch.len();
    match serde_json::to_writer(&mut *batch, event) {
        Ok(()) => batch.push(b'\n'),
        Err(e) => {
            batch.truncate(start);
            tracing::error!(error = %e, "cannot serialise audit event");
        }
    }
}

async fn write_batch(
    sink: &mut Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    batch: &mut Vec<u8>,
    failures: &mut u64,
) {
    if batch.is_empty() {
        return;
    }
    let result = async {
        sink.write_all(batch).await?;
        sink.flush().await
    }
    .await;
    batch.clear();
    // A flush can gather a long backlog; do not keep its buffer.
    if batch.capacity() > 4 * MAX_BATCH {
        batch.shrink_to(MAX_BATCH);
    }
    if let Err(e) = result {
        *failures += 1;
        if failures.is_power_of_two() {
            tracing::error!(error = %e, failures = *failures, "cannot write audit log");
        }
    }
}

#[cfg(test)]
mod tests;
