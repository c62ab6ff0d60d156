//! `tcpgate grants --cluster`: the fleet's grants, as etcd holds them,
//! read through this agent's operator API (`GET /v1/fleet/grants`), with
//! the bastion that issued each. There is no offline fallback: the fleet's
//! grants live in etcd, not in this bastion's pinned maps.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use serde::Serialize;

use super::view;
use crate::cluster::record::{GrantRecord, from_unix_ms};

/// The `schema` field of `--json` output.
pub const SCHEMA: &str = "tcpgate.fleet-grants/v1";

/// One grant of the fleet.
#[derive(Debug, Serialize)]
struct FleetRow {
    grant_id: String,
    subject: String,
    rule: String,
    issuer: String,
    /// The runner address the grant admits.
    source: String,
    /// The bastion that issued it (`[cluster] name`).
    bastion: String,
    created_unix_ms: u64,
    expires_at_unix_ms: u64,
    time_left_seconds: f64,
}

#[derive(Debug, Serialize)]
struct FleetDoc {
    schema: &'static str,
    grants: Vec<FleetRow>,
}

/// Why the fleet's grants could not be listed.
#[derive(Debug, thiserror::Error)]
enum FleetError {
    #[error(transparent)]
    Admin(#[from] super::AdminError),
    #[error("the agent's operator API at {base} did not answer")]
    Send {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "the agent at {base} is not part of a fleet: its configuration has no [cluster] section"
    )]
    NoCluster { base: String },
    #[error("the agent at {base} answered {status}: {message}")]
    Status {
        base: String,
        status: StatusCode,
        message: String,
    },
    #[error("the agent's answer is not a list of fleet grants")]
    Body(#[source] reqwest::Error),
}

fn row(record: GrantRecord) -> FleetRow {
    let expires = from_unix_ms(record.expires_unix_ms);
    FleetRow {
        grant_id: record.id.to_string(),
        time_left_seconds: expires
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_secs_f64(),
        subject: record.subject,
        rule: record.rule,
        issuer: record.issuer,
        source: record.source.to_canonical().to_string(),
        bastion: record.bastion,
        created_unix_ms: record.created_unix_ms,
        expires_at_unix_ms: record.expires_unix_ms,
    }
}

async fn ask(base: &super::AdminEndpoint, timeout: Duration) -> Result<Vec<FleetRow>, FleetError> {
    let response = base
        .client(timeout)?
        .get("/v1/fleet/grants")
        .send()
        .await
        .map_err(|source| FleetError::Send {
            base: base.to_string(),
            source,
        })?;
    let status = response.status();
    if status == StatusCode::NOT_FOUND {
        return Err(FleetError::NoCluster {
            base: base.to_string(),
        });
    }
    if !status.is_success() {
        // The API's own words (etcd unreachable, say), else the status.
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or(body);
        return Err(FleetError::Status {
            base: base.to_string(),
            status,
            message,
        });
    }
    let records: Vec<GrantRecord> = response.json().await.map_err(FleetError::Body)?;
    Ok(records.into_iter().map(row).collect())
}

fn render(rows: &[FleetRow]) -> String {
    let mut table = view::table(&["GRANT", "BASTION", "SUBJECT", "RULE", "SOURCE", "LEFT"]);
    for r in rows {
        table.add_row(vec![
            r.grant_id.clone(),
            r.bastion.clone(),
            r.subject.clone(),
            r.rule.clone(),
            r.source.clone(),
            view::duration(Duration::from_secs_f64(r.time_left_seconds)),
        ]);
    }
    format!("{table}\n{} grant(s) in the fleet", rows.len())
}

/// Lists the fleet's grants; the exit status.
pub fn run(admin: &super::AdminArg, timeout: Duration, json: bool) -> i32 {
    let base = match admin.endpoint() {
        Ok(endpoint) => endpoint,
        Err(e) => {
            eprintln!("tcpgate grants --cluster: {}", crate::error_chain(&e));
            return crate::config::EXIT_CONFIG;
        }
    };
    let grants = match super::block_on_value(ask(&base, timeout)) {
        Some(Ok(grants)) => grants,
        Some(Err(e)) => {
            eprintln!("tcpgate grants --cluster: {}", crate::error_chain(&e));
            return 1;
        }
        None => {
            eprintln!("tcpgate grants --cluster: cannot start the async runtime");
            return 1;
        }
    };
    if json {
        let doc = FleetDoc {
            schema: SCHEMA,
            grants,
        };
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("tcpgate grants --cluster: cannot encode JSON: {e}");
                return 1;
            }
        }
    } else {
        println!("{}", render(&grants));
    }
    0
}
