//! The audit log: one JSON line per session opened, session closed and
//! connection denied. Writing happens on its own task behind a bounded
//! queue, so a slow or failing disk never blocks a session.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Events queued before new ones are dropped (and counted).
const QUEUE_DEPTH: usize = 8192;

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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, serde_json::Value>,
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
}

impl AuditEvent {
    /// An event with only the mandatory fields set.
    #[must_use]
    pub fn new(event: EventKind, source: String, destination: String) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            session_id: None,
            grant_id: None,
            subject: None,
            claims: BTreeMap::new(),
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
        }
    }
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
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the target and spawns the writer task on the current runtime.
    pub async fn open(target: &AuditTarget) -> Result<Self, AuditError> {
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
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(write_loop(rx, sink));
        Ok(Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queues an event without waiting; if the writer is far behind, the
    /// event is dropped and counted rather than stalling the caller.
    pub fn record(&self, event: AuditEvent) {
        if self.tx.try_send(Message::Event(Box::new(event))).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::error!(dropped, "audit log writer is behind; events dropped");
            }
        }
    }

    /// Events dropped because the writer could not keep up.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every event queued so far has been written.
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

async fn write_loop(
    mut rx: mpsc::Receiver<Message>,
    mut sink: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
) {
    let mut failures: u64 = 0;
    while let Some(message) = rx.recv().await {
        let event = match message {
            Message::Event(event) => event,
            Message::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let mut line = match serde_json::to_vec(&event) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise audit event");
                continue;
            }
        };
        line.push(b'\n');
        let result = async {
            sink.write_all(&line).await?;
            sink.flush().await
        }
        .await;
        if let Err(e) = result {
            failures += 1;
            if failures.is_power_of_two() {
                tracing::error!(error = %e, failures, "cannot write audit log");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_json_lines_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&AuditTarget::File(path.clone()))
            .await
            .expect("open");
        for i in 0..3 {
            let mut event = AuditEvent::new(
                EventKind::SessionClose,
                "198.51.100.2:40000".into(),
                "192.0.2.10:5432".into(),
            );
            event.session_id = Some(i.to_string());
            event.reason = Some("client_closed".into());
            log.record(event);
        }
        log.flush().await;
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["session_id"], "2");
        assert_eq!(lines[0]["event"], "session_close");
        assert!(
            lines[0].get("subject").is_none(),
            "unset fields are omitted"
        );
    }

    #[tokio::test]
    async fn unopenable_file_is_a_clear_error() {
        let err = AuditLog::open(&AuditTarget::File("/nonexistent-dir/audit.jsonl".into()))
            .await
            .expect_err("must fail");
        assert!(err.to_string().contains("/nonexistent-dir/audit.jsonl"));
    }
}
