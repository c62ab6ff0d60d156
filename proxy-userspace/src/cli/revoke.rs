//! `tcpgate revoke`: end a grant (or all of a subject's) and its sessions.
//!
//! Through the agent's operator API when it answers; otherwise through the
//! pinned maps (see [`super::revoke_pinned`]).

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["grant_id", "subject"])))]
pub struct RevokeArgs {
    #[command(flatten)]
    pub admin: super::AdminArg,
    /// The grant to revoke (16 hex digits, as `tcpgate grants` shows). Its
    /// token (by `jti`) is refused from then on, until it expires.
    pub grant_id: Option<String>,
    /// Revoke every grant of this token subject instead; the agent refuses
    /// that subject's tokens until the latest `exp` it has seen for them.
    #[arg(long)]
    pub subject: Option<String>,
    /// The agent's pin directory, used when the API does not answer.
    /// Default: `[agent] pin_dir` from the configuration file, else
    /// /sys/fs/bpf/tcpgate.
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// How long to wait for the API before falling back to the pinned maps.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub api_timeout: Duration,
}

/// What to revoke.
#[derive(Debug, Clone)]
pub enum Target {
    Grant(crate::auth::GrantId),
    Subject(String),
}

/// The API did not answer at all (as opposed to answering with an error).
struct Unanswered(String);

pub fn run(args: &RevokeArgs) -> i32 {
    let base = match args.admin.endpoint() {
        Ok(endpoint) => endpoint,
        Err(e) => {
            eprintln!("tcpgate revoke: {}", crate::error_chain(&e));
            return crate::config::EXIT_CONFIG;
        }
    };
    let target = match (&args.grant_id, &args.subject) {
        (Some(id), _) => match id.parse::<crate::auth::GrantId>() {
            Ok(id) => Target::Grant(id),
            Err(e) => {
                eprintln!("tcpgate revoke: {e}");
                return crate::config::EXIT_CONFIG;
            }
        },
        (None, Some(subject)) if !subject.is_empty() => Target::Subject(subject.clone()),
        _ => {
            eprintln!("tcpgate revoke: give a grant id or --subject");
            return crate::config::EXIT_CONFIG;
        }
    };
    let answered = super::block_on_value(via_api(&base, &target, args.api_timeout));
    match answered {
        Some(Ok(status)) => status,
        Some(Err(Unanswered(why))) => {
            eprintln!(
                "tcpgate revoke: the agent's API at {base} did not answer ({why}); revoking through the pinned maps"
            );
            let dir = super::view::pin_dir(args.pin_dir.as_deref(), &args.admin.config, "revoke");
            super::revoke_pinned::run(&dir, &target)
        }
        None => 1,
    }
}

async fn via_api(
    base: &super::AdminEndpoint,
    target: &Target,
    timeout: Duration,
) -> Result<i32, Unanswered> {
    let path = match target {
        Target::Grant(id) => format!("/v1/grants/{id}"),
        Target::Subject(subject) => format!("/v1/grants?subject={}", urlencode(subject)),
    };
    let client = match base.client(timeout) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("tcpgate revoke: {}", crate::error_chain(&e));
            return Ok(crate::config::EXIT_CONFIG);
        }
    };
    let response = client
        .delete(&path)
        .send()
        .await
        .map_err(|e| Unanswered(crate::error_chain(&e)))?;
    let status = response.status();
    let body = response
        .text()
        .await
        .map_err(|e| Unanswered(crate::error_chain(&e)))?;
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or(body);
        eprintln!("tcpgate revoke: {status}: {message}");
        return Ok(1);
    }
    let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let grants = if value.is_array() {
        value.as_array().cloned().unwrap_or_default()
    } else {
        vec![value]
    };
    if grants.is_empty() {
        println!("no live grant matched");
    }
    for grant in grants {
        println!(
            "revoked grant {} ({}), {} session(s) ended",
            grant["grant_id"].as_str().unwrap_or("?"),
            grant["subject"].as_str().unwrap_or("?"),
            grant["sessions"]
        );
    }
    Ok(0)
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
