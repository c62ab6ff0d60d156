//! `tcpgate grants`: live grants, from the agent's operator API, or from
//! the pinned `grants` map when the API does not answer. The output says
//! which source it used.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use proxy_common::addr::read_str;
use proxy_common::grant::{GRANT_FLAG_REVOKED, GRANT_SOURCE, GrantRecord};
use serde::Serialize;
use serde_json::Value;

use super::view;
use crate::pinned::PinnedMaps;

/// The `schema` field of `--json` output.
pub const SCHEMA: &str = "tcpgate.grants/v1";

#[derive(Debug, clap::Args)]
pub struct GrantsArgs {
    #[command(flatten)]
    pub admin: super::AdminArg,
    /// The agent's pin directory, read when the API does not answer.
    /// Default: `[agent] pin_dir` from the configuration file, else
    /// /sys/fs/bpf/tcpgate.
    #[arg(long, value_name = "DIR", conflicts_with = "cluster")]
    pub pin_dir: Option<PathBuf>,
    /// List the grants of the whole fleet (every bastion sharing this
    /// agent's etcd), with the bastion that issued each, instead of the
    /// grants this agent holds. Needs an agent with `[cluster]`; read from
    /// etcd through the agent, so there is no pinned-map fallback.
    #[arg(long)]
    pub cluster: bool,
    /// How long to wait for the API before reading the pinned map (with
    /// `--cluster`: for the fleet's grants, then fail).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub api_timeout: Duration,
    /// Print JSON (schema `tcpgate.grants/v1`; with `--cluster`,
    /// `tcpgate.fleet-grants/v1`).
    #[arg(long)]
    pub json: bool,
}

/// One grant, from either source.
#[derive(Debug, Serialize)]
pub struct GrantRow {
    pub grant_id: String,
    /// `source` or `preamble`.
    pub kind: String,
    pub subject: String,
    pub rule: String,
    /// The address a source grant is bound to.
    pub source: Option<String>,
    pub expires_at_unix_ms: u64,
    pub time_left_seconds: f64,
    /// Live sessions under the grant, when known.
    pub sessions: Option<u64>,
    /// Flagged revoked in the pinned map; the agent applies it when it runs.
    pub revoked_pending: bool,
}

#[derive(Debug, Serialize)]
struct GrantsDoc {
    schema: &'static str,
    /// `api` or `pinned_map`.
    source: &'static str,
    /// Why the pinned map was read instead of the API.
    api_error: Option<String>,
    grants: Vec<GrantRow>,
}

fn time_left(expires: SystemTime) -> f64 {
    expires
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs_f64()
}

fn from_api(value: &Value) -> Option<GrantRow> {
    let text = |key: &str| value[key].as_str().unwrap_or_default().to_owned();
    let expires = humantime::parse_rfc3339_weak(value["expires_at"].as_str()?).ok()?;
    Some(GrantRow {
        grant_id: text("grant_id"),
        kind: text("kind"),
        subject: text("subject"),
        rule: text("rule"),
        source: value["source"].as_str().map(str::to_owned),
        expires_at_unix_ms: view::unix_ms(expires),
        time_left_seconds: time_left(expires),
        sessions: value["sessions"].as_u64(),
        revoked_pending: false,
    })
}

fn from_record(record: &GrantRecord, sessions: Option<u64>) -> GrantRow {
    let expires = view::unix_ns(record.expires_unix_ns).unwrap_or(SystemTime::UNIX_EPOCH);
    let source = record.kind == GRANT_SOURCE;
    GrantRow {
        grant_id: format!("{:016x}", record.grant_id),
        kind: if source { "source" } else { "preamble" }.to_owned(),
        subject: read_str(&record.subject).to_owned(),
        rule: read_str(&record.rule).to_owned(),
        source: source.then(|| view::socket_addr(record.source_addr, 0).ip().to_string()),
        expires_at_unix_ms: view::unix_ms(expires),
        time_left_seconds: time_left(expires),
        sessions,
        revoked_pending: record.flags & GRANT_FLAG_REVOKED != 0,
    }
}

/// Why `GET /v1/grants` gave no grants.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error(transparent)]
    Admin(#[from] super::AdminError),
    #[error(transparent)]
    Send(reqwest::Error),
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    /// Its own text without causes, as this message always showed it.
    #[error("{0}")]
    Body(reqwest::Error),
}

/// `GET /v1/grants`, or why it failed.
async fn ask_api(
    base: &super::AdminEndpoint,
    timeout: Duration,
) -> Result<Vec<GrantRow>, ApiError> {
    let response = base
        .client(timeout)?
        .get("/v1/grants")
        .send()
        .await
        .map_err(ApiError::Send)?;
    if !response.status().is_success() {
        return Err(ApiError::Status(response.status()));
    }
    let values: Vec<Value> = response.json().await.map_err(ApiError::Body)?;
    Ok(values.iter().filter_map(from_api).collect())
}

/// Grants from the pinned map, with their session counts when readable.
pub fn from_pins(maps: &PinnedMaps) -> Result<Vec<GrantRow>, crate::pinned::PinnedError> {
    let counts: Option<HashMap<u64, u64>> = maps.sessions().ok().map(|sessions| {
        let mut counts = HashMap::new();
        for s in sessions {
            *counts.entry(s.grant_id).or_default() += 1;
        }
        counts
    });
    let mut rows: Vec<GrantRow> = maps
        .grants()?
        .iter()
        .map(|r| {
            let sessions = counts
                .as_ref()
                .map(|c| c.get(&r.grant_id).copied().unwrap_or(0));
            from_record(r, sessions)
        })
        .collect();
    rows.sort_by_key(|r| r.expires_at_unix_ms);
    Ok(rows)
}

fn render(rows: &[GrantRow]) -> String {
    let mut table = view::table(&[
        "GRANT", "KIND", "SUBJECT", "RULE", "SOURCE", "LEFT", "SESSIONS",
    ]);
    for r in rows {
        let mut left = view::duration(Duration::from_secs_f64(r.time_left_seconds));
        if r.revoked_pending {
            left.push_str(" (revoked, pending)");
        }
        table.add_row(vec![
            r.grant_id.clone(),
            r.kind.clone(),
            r.subject.clone(),
            r.rule.clone(),
            r.source.clone().unwrap_or_else(|| "-".to_owned()),
            left,
            r.sessions.map_or_else(|| "?".to_owned(), |n| n.to_string()),
        ]);
    }
    format!("{table}\n{} grant(s)", rows.len())
}

pub fn run(args: &GrantsArgs) -> i32 {
    if args.cluster {
        return super::fleet_grants::run(&args.admin, args.api_timeout, args.json);
    }
    let base = match args.admin.endpoint() {
        Ok(endpoint) => endpoint,
        Err(e) => {
            eprintln!("tcpgate grants: {}", crate::error_chain(&e));
            return crate::config::EXIT_CONFIG;
        }
    };
    let api = super::block_on_value(ask_api(&base, args.api_timeout));
    let doc = match api {
        Some(Ok(grants)) => {
            if !args.json {
                eprintln!("grants from the agent's API at {base}");
            }
            GrantsDoc {
                schema: SCHEMA,
                source: "api",
                api_error: None,
                grants,
            }
        }
        failed => {
            let why = match failed {
                Some(Err(e)) => crate::error_chain(&e),
                _ => "cannot start the async runtime".to_owned(),
            };
            let dir = view::pin_dir(args.pin_dir.as_deref(), &args.admin.config, "grants");
            let grants = match PinnedMaps::open(&dir).and_then(|maps| from_pins(&maps)) {
                Ok(grants) => grants,
                Err(e) => {
                    eprintln!(
                        "tcpgate grants: the agent's API at {base} did not answer ({why}), and the pinned map cannot be read: {}",
                        crate::error_chain(&e)
                    );
                    return 1;
                }
            };
            if !args.json {
                eprintln!(
                    "the agent's API at {base} did not answer ({why}); grants from the pinned map in {}",
                    dir.display()
                );
            }
            GrantsDoc {
                schema: SCHEMA,
                source: "pinned_map",
                api_error: Some(why),
                grants,
            }
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("tcpgate grants: cannot encode JSON: {e}");
                return 1;
            }
        }
    } else {
        println!("{}", render(&doc.grants));
    }
    0
}
