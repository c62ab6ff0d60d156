//! `tcpgate run`.

use std::path::PathBuf;

use crate::config::{Config, DatapathChoice, EXIT_CONFIG, Overrides};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Override `agent.datapath`: `ebpf` fails if eBPF cannot load; `auto`
    /// falls back to the user-space copy with a warning.
    #[arg(long, value_enum)]
    pub datapath: Option<DatapathChoice>,
    /// Override `agent.pin_dir`, the bpffs directory for the pinned maps.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Take over from the agent running in this network namespace: its
    /// listeners (no connection is refused), its grants, its pins and
    /// interception. Its live sessions go on in it until they end. Without
    /// a running agent (or if it does not answer within
    /// `agent.takeover_timeout`), starts as without this flag. A running
    /// agent sent SIGUSR2 starts its successor this way itself (the
    /// upgrade path under systemd; see docs/operating.md).
    #[arg(long)]
    pub takeover: bool,
    /// Stay in the foreground as the agents' parent (what the systemd unit
    /// runs): starts the agent as a child with the other arguments; on
    /// SIGUSR2 starts a successor with `--takeover` from the same binary
    /// path (the upgrade path), and keeps the old agent serving should it
    /// fail; forwards SIGHUP to the serving agent (config reload) and
    /// SIGTERM/SIGINT to every agent, waiting for their drain; relays their
    /// readiness to systemd. See docs/operating.md.
    #[arg(long)]
    pub supervise: bool,
}

pub fn run(args: RunArgs) -> i32 {
    if args.supervise {
        return crate::supervise::run();
    }
    let config = match Config::load(&args.config.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tcpgate: {e}");
            return EXIT_CONFIG;
        }
    };
    let config = config.with_overrides(&Overrides {
        datapath: args.datapath,
        pin_dir: args.pin_dir,
    });
    if let Err(e) = crate::sockopt::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the open-files limit; the session capacity may be lower");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tcpgate: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(crate::agent::run(
        config,
        args.config.config.clone(),
        args.takeover,
    )) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "agent failed");
            eprintln!("tcpgate: {}", crate::error_chain(&e));
            1
        }
    }
}
