//! Reading the agent's JSON-lines audit file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read audit file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit file {path} line {line_no} is not JSON: {line}")]
    Parse {
        path: PathBuf,
        line_no: usize,
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Waited(#[from] crate::NotWithin),
    #[error("no matching event in audit file {path} within {timeout:?}; events so far: {events:?}")]
    Timeout {
        path: PathBuf,
        timeout: Duration,
        events: Vec<Value>,
    },
}

/// The file's complete JSON lines (none if it does not exist yet). A last
/// line without its newline is still being written and is skipped.
pub fn read_audit(path: &Path) -> Result<Vec<Value>, AuditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AuditError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line).map_err(|source| AuditError::Parse {
                path: path.to_owned(),
                line_no: index + 1,
                line: line.to_owned(),
                source,
            })
        })
        .collect()
}

/// Polls the file until an event matches `pred`, for at most `timeout`;
/// returns that event.
pub fn wait_for_audit(
    path: &Path,
    pred: impl Fn(&Value) -> bool,
    timeout: Duration,
) -> Result<Value, AuditError> {
    let mut events = Vec::new();
    let found = crate::eventually(timeout, "a matching audit event", || {
        events = read_audit(path)?;
        Ok::<_, AuditError>(events.iter().find(|e| pred(e)).cloned())
    });
    match found {
        Err(AuditError::Waited(_)) => Err(AuditError::Timeout {
            path: path.to_owned(),
            timeout,
            events,
        }),
        other => other,
    }
}
