//! The `tcpgate` command line: one module per verb, doc comments as help.

mod check_config;
mod run;

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
}

/// Where the configuration comes from.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path of the TOML configuration file.
    #[arg(long, short, default_value = crate::config::DEFAULT_CONFIG_PATH, env = "TCPGATE_CONFIG")]
    pub config: PathBuf,
}

/// Runs the parsed command; returns the process exit code.
#[must_use]
pub fn dispatch(cli: Cli) -> i32 {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::CheckConfig(args) => check_config::run(&args),
    }
}

/// Installs the tracing subscriber for the chosen format.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("invalid --log-level {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot initialise logging: {e}"))
}
