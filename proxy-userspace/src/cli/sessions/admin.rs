//! Source 3: the agent's operator endpoint, `GET /v1/sessions`: every
//! session it holds, with counters that grow on the user-space path too.
//! It is the only source for an agent without the eBPF programs
//! (`--datapath userspace`, forward-only): such an agent pins nothing.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{Datapath, SessionRow, Source};
use crate::cli::admin::{AdminClient, AdminEndpoint, AdminError};

/// Why the operator endpoint gave no sessions.
#[derive(Debug, thiserror::Error)]
pub enum AdminReadError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("no answer")]
    Send(#[source] reqwest::Error),
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    #[error("answered something that is not a list of sessions")]
    Body(#[source] serde_json::Error),
}

/// The operator endpoint and a client for it (made once, reused by every
/// refresh of `--watch`).
pub struct AdminSource {
    /// The endpoint, or where it was to be read from.
    pub location: String,
    client: Result<AdminClient, String>,
}

impl AdminSource {
    /// `endpoint` is `Err((where, why))` when the configuration naming it
    /// cannot be used (an operator who may not read it): this source then
    /// fails at each reading, and the pinned maps still answer.
    #[must_use]
    pub fn new(endpoint: Result<AdminEndpoint, (String, String)>, timeout: Duration) -> Self {
        match endpoint {
            Ok(endpoint) => Self {
                location: endpoint.to_string(),
                client: endpoint.client(timeout).map_err(|e| crate::error_chain(&e)),
            },
            Err((location, why)) => Self {
                location,
                client: Err(why),
            },
        }
    }

    /// The listed sessions, or why there are none (the message of a
    /// client that could not be made, e.g. an unreadable token file).
    pub async fn read(&self, now: SystemTime) -> Result<Vec<SessionRow>, String> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let body = fetch(client).await.map_err(|e| crate::error_chain(&e))?;
        parse(&body, now).map_err(|e| crate::error_chain(&e))
    }
}

async fn fetch(client: &AdminClient) -> Result<String, AdminReadError> {
    let response = client
        .get("/v1/sessions")
        .send()
        .await
        .map_err(AdminReadError::Send)?;
    let status = response.status();
    if !status.is_success() {
        return Err(AdminReadError::Status(status));
    }
    response.text().await.map_err(AdminReadError::Send)
}

/// The rows of a `GET /v1/sessions` answer (see `api::admin::SessionView`).
pub fn parse(body: &str, now: SystemTime) -> Result<Vec<SessionRow>, AdminReadError> {
    let list: Vec<Value> = serde_json::from_str(body).map_err(AdminReadError::Body)?;
    Ok(list.iter().map(|v| row(v, now)).collect())
}

fn row(value: &Value, now: SystemTime) -> SessionRow {
    let text = |key: &str| value[key].as_str().unwrap_or_default().to_owned();
    let time = |key: &str| {
        value[key]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
    };
    // A session the pinned map does not hold is one only user space moves
    // (the merge keeps the pinned record's path when both list it).
    let mut row = SessionRow::new(
        text("session_id"),
        Source::OperatorSocket,
        Datapath::Userspace,
    );
    row.grant_id = value["grant_id"].as_str().map(str::to_owned);
    row.subject = text("subject");
    row.client = text("client");
    row.destination = text("destination");
    row.upstream = text("upstream");
    row.auth = match value["auth"].as_str() {
        Some("preamble") => "preamble",
        Some("source_grant") => "source_grant",
        _ => "none",
    };
    row.set_times(now, time("started_at").unwrap_or(now), time("expires_at"));
    row.bytes_up = value["bytes_up"].as_u64().unwrap_or_default();
    row.bytes_down = value["bytes_down"].as_u64().unwrap_or_default();
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_sockets_sessions_become_rows() {
        let body = r#"[{"session_id":"00000000000000aa","grant_id":null,"subject":"ci",
            "client":"198.51.100.7:40000","destination":"192.0.2.10:9000",
            "upstream":"192.0.2.10:9000","started_at":"2026-01-01T00:00:00Z",
            "expires_at":null,"bytes_up":10,"bytes_down":20,"auth":"preamble"}]"#;
        let now = humantime::parse_rfc3339("2026-01-01T00:01:00Z").expect("a time");
        let rows = parse(body, now).expect("a list");
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.session_id, "00000000000000aa");
        assert_eq!((row.bytes_up, row.bytes_down), (10, 20));
        assert_eq!((row.auth, row.datapath), ("preamble", Datapath::Userspace));
        assert_eq!(row.listed_by, vec![Source::OperatorSocket]);
        assert!((row.age_seconds - 60.0).abs() < 1e-6);
        assert!(row.time_left_seconds.is_none());
        assert!(parse("{\"error\":1}", now).is_err());
    }
}
