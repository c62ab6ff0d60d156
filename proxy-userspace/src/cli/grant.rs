//! `tcpgate grant`: ask the agent for a grant bound to this host's address.

use std::path::PathBuf;
use std::time::Duration;

use crate::auth::client::{ClientError, TokenSource, request_grant};
use crate::dest::{Destination, DestinationSpec};

#[derive(Debug, clap::Args)]
pub struct GrantArgs {
    #[command(flatten)]
    pub token: super::TokenArgs,
    /// The agent's grant API, e.g. `https://bastion.example:8443`.
    /// Repeat it to get one grant per address family: each grant is bound
    /// to the address this host calls from, e.g. `--api https://198.51.100.1:8443
    /// --api https://[2001:db8:100::1]:8443` on a dual-stack runner.
    #[arg(
        long,
        value_name = "URL",
        env = "TCPGATE_API",
        value_delimiter = ',',
        required = true
    )]
    pub api: Vec<String>,
    /// Narrow the grant to these destinations (repeatable):
    /// `PREFIX=PORTS`, e.g. `192.0.2.10=5432` or `2001:db8::/64=22,8000-8099`.
    /// Default: everything the matching policy rule allows.
    #[arg(long = "allow", value_name = "PREFIX=PORTS", value_parser = parse_allow)]
    pub allow: Vec<Destination>,
    /// Shorten the grant (it never outlives the token or the rule's maximum).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lifetime: Option<Duration>,
    /// Trust only the certificates in FILE (PEM) for the API, instead of
    /// the system store: the private CA that signed the API's certificate,
    /// or a self-signed API certificate itself (as `curl --cacert` does).
    #[arg(
        long,
        visible_alias = "ca-file",
        value_name = "FILE",
        env = "TCPGATE_CA"
    )]
    pub ca: Option<PathBuf>,
    /// Print the grant as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A `--allow` value that names no destination.
#[derive(Debug, thiserror::Error)]
enum AllowError {
    #[error("{0:?}: expected PREFIX=PORTS, e.g. 192.0.2.10=5432")]
    Shape(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<crate::dest::DestinationParseError>),
}

fn parse_allow(text: &str) -> Result<Destination, AllowError> {
    let (prefix, ports) = text
        .rsplit_once('=')
        .ok_or_else(|| AllowError::Shape(text.to_owned()))?;
    let spec = DestinationSpec {
        prefix: prefix.to_owned(),
        ports: ports.split(',').map(str::to_owned).collect(),
    };
    Destination::parse(&spec).map_err(AllowError::Invalid)
}

pub fn run(args: &GrantArgs) -> i32 {
    super::block_on(async {
        let source = match args.token.source() {
            Ok(source) => source,
            Err(e) => return fail(&e),
        };
        let allow = (!args.allow.is_empty()).then_some(args.allow.as_slice());
        let mut grants = Vec::new();
        for api in &args.api {
            // Read for each API: a signed AWS request is good for one use.
            let token = match source.read() {
                Ok(token) => token,
                Err(e) => return fail(&e),
            };
            match request_grant(api, &token, allow, args.lifetime, args.ca.as_deref()).await {
                Ok(grant) => grants.push(grant),
                // Grants already made stay: they expire with the token.
                Err(e) => return fail(&e),
            }
        }
        if args.json {
            // One API: the grant itself (the v1 output); several: a list.
            let text = match grants.as_slice() {
                [one] => serde_json::to_string_pretty(one),
                all => serde_json::to_string_pretty(all),
            };
            println!("{}", text.unwrap_or_default());
            return 0;
        }
        for grant in &grants {
            print_grant(grant);
        }
        0
    })
}

fn print_grant(grant: &crate::auth::api_types::GrantResponse) {
    let left = grant
        .expires_at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    println!(
        "grant {} for {} from {} (rule {})",
        grant.grant_id, grant.subject, grant.source, grant.rule
    );
    println!(
        "  expires {} (in {})",
        humantime::format_rfc3339_seconds(grant.expires_at),
        humantime::format_duration(Duration::from_secs(left.as_secs()))
    );
    for dest in &grant.destinations {
        println!("  allows {dest}");
    }
}

fn fail(e: &ClientError) -> i32 {
    eprintln!("tcpgate grant: {}", crate::error_chain(e));
    match e {
        ClientError::Api {
            status: 401 | 403, ..
        } => 77,
        e if TokenSource::is_usage_error(e) => crate::config::EXIT_CONFIG,
        _ => 1,
    }
}
