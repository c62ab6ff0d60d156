//! `tcpgate-bench`: the benchmark and the end-to-end demo, in network
//! namespaces of their own, built on the integration tests' RAII toolkit.
//!
//! `cargo xtask bench` and `cargo xtask demo` run setup, build the agent
//! and this binary, and run it with `TCPGATE_BIN` set; running it directly
//! works the same once both are built.

mod bench;
mod demo;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "tcpgate-bench",
    about = "tcpgate's benchmark and end-to-end demo (as root)"
)]
struct Cli {
    /// The tcpgate binary (agent and CLI) to run.
    #[arg(long, env = tcpgate_tests::agent::BIN_ENV, value_name = "PATH", global = true)]
    tcpgate: Option<PathBuf>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Benchmark tcpgate against direct forwarding, HAProxy and socat.
    ///
    /// Sets up runner, bastion and target namespaces, and measures
    /// throughput, CPU per GiB, request/response latency, authenticated
    /// connection rates, agent memory with 10,000 idle sessions and
    /// teardown latency at grant expiry. Prints medians, spreads and ratios
    /// against direct and HAProxy, and writes results.json, results.md and
    /// chart.svg to --out.
    Bench(bench::BenchArgs),
    /// Run a kernel-spliced session end to end.
    ///
    /// Sets up a runner, a bastion and a target in network namespaces of
    /// its own, starts the tcpgate agent on the bastion, and connects from
    /// the runner to a real service on the target with a token. It shows
    /// the connection intercepted, authenticated, spliced in the kernel
    /// through the SOCKHASH, and torn down, then removes everything it
    /// created.
    Demo(demo::DemoArgs),
}

/// Errors print with their causes (anyhow's `Debug`) and exit 1.
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tcpgate = cli.tcpgate.with_context(|| {
        format!(
            "which tcpgate binary? Pass --tcpgate PATH or set {} \
             (`cargo xtask bench` and `cargo xtask demo` do)",
            tcpgate_tests::agent::BIN_ENV
        )
    })?;
    match &cli.verb {
        Verb::Bench(args) => bench::run(&tcpgate, args),
        Verb::Demo(args) => demo::run(&tcpgate, args),
    }
}

/// Whether this process runs as root: both verbs create network namespaces
/// and load eBPF programs.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bench_and_demo_take_their_flags_and_the_binary_from_either_side() {
        let cli = Cli::try_parse_from([
            "tcpgate-bench",
            "bench",
            "--quick",
            "--only",
            "rss,latency",
            "--tcpgate",
            "/x/tcpgate",
            "--bpf-stats",
        ])
        .expect("parses");
        assert_eq!(cli.tcpgate, Some(PathBuf::from("/x/tcpgate")));
        let Verb::Bench(args) = cli.verb else {
            panic!("parsed as {:?}", cli.verb);
        };
        assert!(args.quick && args.bpf_stats);
        assert_eq!(args.only.len(), 2);
        let cli = Cli::try_parse_from(["tcpgate-bench", "demo", "--bytes", "1024", "--verbose"])
            .expect("parses");
        let Verb::Demo(args) = cli.verb else {
            panic!("parsed as {:?}", cli.verb);
        };
        assert_eq!((args.bytes, args.verbose), (1024, true));
        assert!(Cli::try_parse_from(["tcpgate-bench", "bench", "--runs", "0"]).is_err());
    }
}
