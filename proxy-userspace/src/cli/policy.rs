//! `tcpgate policy explain`: what the configured policy does with a token,
//! rule by rule, without a running agent. The decision comes from the same
//! [`Policy`] loop the gate and the grant API use.

mod render;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use clap::Subcommand;

use crate::auth::client::read_token_file;
use crate::auth::{Policy, TokenValidator};
use crate::config::{Config, EXIT_CONFIG};

/// Exit status when the token cannot be checked because its issuer's keys
/// cannot be loaded (`EX_UNAVAILABLE`).
const EXIT_KEYS: i32 = 69;

#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show what the policy does with a token: its claims, each rule tried
    /// and why it matched or not, and the resulting grant or decision.
    ///
    /// The token is validated offline against the issuer's `jwks_file`, or
    /// keys fetched from its `jwks_url` (or OIDC discovery); with `--aws`,
    /// this shell's AWS identity is asked of `[auth.aws]`'s STS. Exits 0 when
    /// allowed, 77 when denied or the token is invalid (the failed check is
    /// named), 64 on a bad config or usage, 69 when keys cannot be loaded.
    Explain(ExplainArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// File holding the JWT to explain (or a signed AWS request, `aws-sts.…`).
    #[arg(long, value_name = "FILE", required_unless_present = "aws")]
    pub token_file: Option<PathBuf>,
    /// Explain this shell's AWS identity instead: sign a GetCallerIdentity
    /// with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN
    /// for the config's `[auth.aws]` server_id and sts_endpoint, and ask
    /// that STS (live) who it is.
    #[arg(long, conflicts_with = "token_file")]
    pub aws: bool,
    /// Decide a connection to this destination (`HOST:PORT`), as the gate
    /// would. Without it: the grant `tcpgate grant` would get.
    #[arg(long, value_name = "HOST:PORT")]
    pub dest: Option<String>,
    /// Print one JSON object (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The token to explain: the file's, or one signed now for `[auth.aws]`.
fn token(args: &ExplainArgs, auth: &crate::auth::AuthConfig) -> Result<String, String> {
    if let Some(path) = &args.token_file {
        return read_token_file(path).map_err(|e| crate::error_chain(&e));
    }
    let aws = auth
        .aws
        .as_ref()
        .ok_or("--aws: the config has no [auth.aws] section")?;
    let signing = crate::auth::aws::runner::AwsSigning {
        server_id: aws.server_id.clone(),
        sts_endpoint: Some(aws.sts_endpoint.clone()),
    };
    // Signed for the region the bastion requires, when it names one.
    let region = aws.region.clone();
    let env = move |name: &str| match (name, &region) {
        ("AWS_REGION", Some(region)) => Some(region.clone()),
        _ => std::env::var(name).ok(),
    };
    signing
        .token_with(env, SystemTime::now())
        .map_err(|e| e.to_string())
}

pub fn run(args: &PolicyArgs) -> i32 {
    match &args.command {
        PolicyCommand::Explain(explain) => super::block_on(run_explain(explain)),
    }
}

fn usage(message: &str) -> i32 {
    eprintln!("tcpgate policy explain: {message}");
    EXIT_CONFIG
}

async fn run_explain(args: &ExplainArgs) -> i32 {
    let config = match Config::load(&args.config.config) {
        Ok(config) => config,
        Err(e) => return usage(&e.to_string()),
    };
    let Some(auth) = &config.auth else {
        return usage(
            "the config says auth = \"none\": every connection is admitted, no token is read",
        );
    };
    let dest: Option<SocketAddr> = match &args.dest {
        None => None,
        Some(text) => match super::connect::resolve(text).await {
            Ok(addr) => Some(addr),
            Err(e) => return usage(&format!("--dest: {}", crate::error_chain(&e))),
        },
    };
    let raw = match token(args, auth) {
        Ok(token) => token,
        Err(message) => return usage(&message),
    };
    let policy = match Policy::from_config(&config.policy, auth) {
        Ok(policy) => policy,
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return usage(&lines.join("\n"));
        }
    };
    let validator = match TokenValidator::load(auth).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tcpgate policy explain: {}", crate::error_chain(&e));
            return EXIT_KEYS;
        }
    };
    let report = match validator.validate(&raw).await {
        Ok(token) => {
            let explanation = policy.explain(&token, dest, SystemTime::now());
            render::Report::explained(&token, dest, &explanation)
        }
        Err(e) => {
            let issuer = render::unverified_issuer(&raw);
            let key_problem = issuer.as_deref().and_then(|i| validator.key_problem(i));
            render::Report::invalid(&e, key_problem)
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("tcpgate policy explain: cannot encode the report: {e}"),
        }
    } else {
        print!("{}", report.table());
    }
    if report.decision.allowed {
        0
    } else {
        super::connect::EXIT_DENIED
    }
}
