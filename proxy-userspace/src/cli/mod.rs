//! The `tcpgate` command line: one module per verb, doc comments as help.

mod admin;
mod check_config;
mod completions;
mod connect;
mod firewall;
mod fleet_grants;
mod grant;
mod grants;
mod manpage;
mod policy;
mod revoke;
mod revoke_pinned;
mod run;
mod sessions;
mod view;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// tcpgate: a transparent, token-authenticated TCP proxy for bastion hosts.
///
/// The agent intercepts connections, admits them by short-lived token, and
/// splices client and upstream sockets inside the kernel with eBPF.
#[derive(Debug, Parser)]
#[command(name = "tcpgate", version, propagate_version = true)]
pub struct Cli {
    /// Log format for the agent's own logs (stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TCPGATE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info`, `debug`, `tcpgate=debug,warn`.
    #[arg(long, global = true, default_value = "info", env = "TCPGATE_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground.
    Run(run::RunArgs),
    /// Validate a configuration file without starting anything.
    ///
    /// Exits 0 when the file is valid, 64 with one line per bad field
    /// otherwise.
    CheckConfig(check_config::CheckConfigArgs),
    /// Connect to a service through the bastion with a token preamble.
    ///
    /// Relays stdin/stdout (use it as an ssh `ProxyCommand`), or with
    /// `--listen` forwards a local port. Exits 77 when the agent denies the
    /// token, with its reason on stderr. In stdin/stdout mode it exits when
    /// the connection ends: 1 at once on a reset; 0 after a half-close from
    /// stdin and the service's EOF; 1 when the service closed and stdin was
    /// still open `--linger` later.
    Connect(connect::ConnectArgs),
    /// Ask the agent for a grant bound to this host's address.
    ///
    /// Afterwards, unmodified clients (psql, ssh, curl) reach the allowed
    /// destinations without a preamble until the grant expires.
    Grant(grant::GrantArgs),
    /// Revoke a grant, or every grant of a subject, ending their sessions.
    ///
    /// Uses the agent's operator API; when it does not answer, flags the
    /// grants revoked in the pinned map and destroys their sessions'
    /// sockets directly (root, in the agent's network namespace).
    Revoke(revoke::RevokeArgs),
    /// List every live session: kernel-path and pinned user-space ones from
    /// the pinned `sessions` map, routed flows from the pinned `flows` map,
    /// and a forward-only agent's user-space sessions from its operator
    /// socket (`GET /v1/sessions`).
    ///
    /// The pinned maps answer without the agent, for members of `[agent]
    /// operator_group` without root; an operator socket that does not
    /// answer is noted, not an error.
    Sessions(sessions::SessionsArgs),
    /// List live grants, from the agent's API or else the pinned map.
    Grants(grants::GrantsArgs),
    /// Inspect the access policy offline (`explain`: what it does with a token).
    Policy(policy::PolicyArgs),
    /// Install, show or remove the guard table (nftables) that drops the
    /// protected prefixes whether or not the agent runs.
    ///
    /// Exits 0 when done, 64 on a configuration error, 69 when nft is
    /// missing or fails.
    Firewall(firewall::FirewallArgs),
    /// Print a shell completion script (for packagers).
    #[command(hide = true)]
    Completions(completions::CompletionsArgs),
    /// Print or write man pages (for packagers).
    #[command(hide = true)]
    Manpage(manpage::ManpageArgs),
}

pub use admin::{AdminArg, AdminClient, AdminEndpoint, AdminError};

/// Runs a client command on a small runtime.
pub fn block_on<F: std::future::Future<Output = i32>>(future: F) -> i32 {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            let status = runtime.block_on(future);
            // Not a plain drop: that waits for every blocking task, and
            // tokio's stdin (`tcpgate connect`) is a read(2) on a blocking
            // thread that returns only with the next input or EOF. A command
            // that is done must exit now, not when its stdin next moves.
            runtime.shutdown_background();
            status
        }
        Err(e) => {
            eprintln!("tcpgate: cannot start the async runtime: {e}");
            1
        }
    }
}

/// Runs a future on a small runtime; `None` (after saying why) if the
/// runtime cannot start.
pub fn block_on_value<T, F: std::future::Future<Output = T>>(future: F) -> Option<T> {
    current_thread_runtime().map(|runtime| runtime.block_on(future))
}

/// A current-thread runtime for a command; `None`, with the reason on
/// stderr, when it cannot start.
pub fn current_thread_runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .inspect_err(|e| eprintln!("tcpgate: cannot start the async runtime: {e}"))
        .ok()
}

/// Where the configuration comes from.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path of the TOML configuration file.
    #[arg(long, short, default_value = crate::config::DEFAULT_CONFIG_PATH, env = "TCPGATE_CONFIG")]
    pub config: PathBuf,
}

/// Where `grant` and `connect` read the job's token.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// File holding the job's JWT (e.g. a CI `id_tokens` variable written
    /// to disk).
    #[arg(long, value_name = "FILE", conflicts_with = "token_env")]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the job's JWT. Without either option,
    /// in a GitLab job (CI=true, GITLAB_CI=true): TCPGATE_TOKEN.
    #[arg(long, value_name = "NAME", conflicts_with = "aws")]
    pub token_env: Option<String>,
    /// Prove this runner's AWS IAM role instead of sending a JWT: sign an
    /// STS GetCallerIdentity with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    /// and AWS_SESSION_TOKEN (region from AWS_REGION or AWS_DEFAULT_REGION),
    /// for the bastion named by --aws-server-id. The secret key never
    /// leaves this host; the bastion asks STS who signed.
    #[arg(long, conflicts_with = "token_file", requires = "aws_server_id")]
    pub aws: bool,
    /// With --aws: the bastion's `[auth.aws] server_id`, signed into the
    /// request so that no other bastion accepts it.
    #[arg(long, value_name = "ID", env = "TCPGATE_AWS_SERVER_ID")]
    pub aws_server_id: Option<String>,
    /// With --aws: the STS endpoint to sign for. Default: the region's,
    /// https://sts.REGION.amazonaws.com/ (the global one without a region).
    #[arg(long, value_name = "URL", env = crate::auth::aws::runner::ENDPOINT_ENV)]
    pub aws_sts_endpoint: Option<String>,
}

impl TokenArgs {
    /// The chosen source, or why there is none.
    pub fn source(
        &self,
    ) -> Result<crate::auth::client::TokenSource, crate::auth::client::ClientError> {
        if self.aws {
            return Ok(crate::auth::client::TokenSource::Aws(
                crate::auth::aws::runner::AwsSigning {
                    server_id: self.aws_server_id.clone().unwrap_or_default(),
                    sts_endpoint: self.aws_sts_endpoint.clone(),
                },
            ));
        }
        crate::auth::client::TokenSource::choose(
            self.token_file.as_deref(),
            self.token_env.as_deref(),
            |name| std::env::var(name).ok(),
        )
    }
}

/// Runs the parsed command; returns the process exit code.
#[must_use]
pub fn dispatch(cli: Cli) -> i32 {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::CheckConfig(args) => check_config::run(&args),
        Command::Connect(args) => connect::run(&args),
        Command::Grant(args) => grant::run(&args),
        Command::Revoke(args) => revoke::run(&args),
        Command::Sessions(args) => sessions::run(&args),
        Command::Grants(args) => grants::run(&args),
        Command::Policy(args) => policy::run(&args),
        Command::Firewall(args) => firewall::run(&args),
        Command::Completions(args) => completions::run(&args),
        Command::Manpage(args) => manpage::run(&args),
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid --log-level {filter:?}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot initialise logging")]
    Init(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Installs the tracing subscriber for the chosen format.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), LoggingError> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|source| LoggingError::Filter {
            filter: filter.to_owned(),
            source,
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(LoggingError::Init)
}
