//! tcpgate's developer tasks, run as `cargo xtask <verb>`.

mod build;
mod cmd;
mod fuzz;
mod handover;
mod host;
mod install;
mod setup;
mod test;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "tcpgate's developer tasks",
    long_about = "tcpgate's developer tasks. `build`, `test`, `demo` and `bench` first run \
                  `setup`, which installs what is missing and leaves alone what is there."
)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Install what building and testing needs: rust-src, bpf-linker, Debian packages, bpffs.
    ///
    /// Each step checks first and prints one line saying what it found or
    /// did; a second run changes nothing. Installing Debian packages and
    /// mounting bpffs need root.
    Setup,
    /// Build the tcpgate binary (agent and CLI, with its eBPF object).
    Build(build::BuildArgs),
    /// Run every test, including the privileged integration tests (as root).
    ///
    /// Runs setup, checks formatting, runs clippy on the whole workspace
    /// (tcpgate-bench included; warnings fail), shellchecks scripts/, builds
    /// tcpgate, then `cargo test` for the whole workspace with TCPGATE_BIN
    /// pointing at the binary and
    /// TCPGATE_PRIVILEGED_TESTS=required, so tests that need root, network
    /// namespaces or eBPF fail instead of skipping.
    Test(test::TestArgs),
    /// Build everything and run a kernel-spliced session end to end (as root).
    ///
    /// The demo sets up a runner, a bastion and a target in network
    /// namespaces of its own, starts the tcpgate agent on the bastion, and
    /// connects from the runner to a real service on the target with a
    /// token. It shows the connection intercepted, authenticated, spliced in
    /// the kernel through the SOCKHASH, and torn down, then removes
    /// everything it created.
    ///
    /// Runs setup, builds tcpgate and tcpgate-bench, then runs
    /// `tcpgate-bench demo ARGS`: --bytes N (each way, default 64 MiB),
    /// --verbose (print the agent's log). `cargo xtask demo --help` shows
    /// this; `cargo xtask demo -- --help` shows tcpgate-bench's own help.
    Demo(handover::PassArgs),
    /// Install tcpgate as a systemd service (as root), or stage it with --destdir.
    ///
    /// Builds in release mode, then installs the binary, the systemd units,
    /// shell completions, man pages, an example /etc/tcpgate/tcpgate.toml
    /// (never overwriting one), the tcpgate user, the tcpgate-operators
    /// group and /var/log/tcpgate. Says what it did or found in place; a
    /// second run changes nothing.
    Install(install::InstallArgs),
    /// Remove what install added; the config and audit log stay unless --purge.
    Uninstall(install::UninstallArgs),
    /// Benchmark tcpgate against direct forwarding, HAProxy and socat (as root).
    ///
    /// Measures throughput, CPU per GiB, request/response latency,
    /// authenticated connection rates, agent memory with 10,000 idle
    /// sessions, teardown latency at grant expiry, and in a fleet the grant
    /// API with and without etcd and a revocation across bastions. Prints medians,
    /// spreads and ratios against direct and HAProxy, and writes
    /// target/bench/results.json, results.md and chart.svg.
    ///
    /// Runs setup, builds the agent and tcpgate-bench in release mode, then
    /// runs `tcpgate-bench bench ARGS`: --quick (under 3 minutes), --runs N,
    /// --only throughput,latency,connrate,rss,teardown,fleet, --out DIR.
    /// `cargo xtask bench -- --help` shows tcpgate-bench's own help.
    Bench(handover::PassArgs),
    /// Fuzz the parsers (preamble, tokens and policy, config, grant API) with cargo-fuzz.
    ///
    /// Needs the nightly toolchain (never downloaded here); installs
    /// cargo-fuzz and nightly's rust-src when missing. Runs each target, or
    /// the one named, for --time seconds from fuzz/corpus/<target> with
    /// fuzz/dict/<target>.dict, then prints coverage and speed per target.
    /// Fails on a crash, naming the input and how to reproduce it.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = host::Host::detect().and_then(|host| match &cli.verb {
        Verb::Setup => setup::run(&host),
        Verb::Build(args) => build::run(&host, args),
        Verb::Test(args) => test::run(&host, args),
        Verb::Demo(args) => handover::run(&host, handover::Verb::Demo, args),
        Verb::Install(args) => install::install(&host, args),
        Verb::Uninstall(args) => install::uninstall(&host, args),
        Verb::Bench(args) => handover::run(&host, handover::Verb::Bench, args),
        Verb::Fuzz(args) => fuzz::run(&host, args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The cause chain without anyhow's backtrace: these errors are
            // about the machine, not about xtask's code.
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Time since `started`, for humans: `0.4s`, `73s`, `2m05s`.
pub(crate) fn took(started: Instant) -> String {
    human_duration(started.elapsed())
}

fn human_duration(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    if secs < 10 {
        format!("{:.1}s", elapsed.as_secs_f64())
    } else if secs < 120 {
        format!("{secs}s")
    } else {
        format!("{}m{:02}s", secs / 60, secs % 60)
    }
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
    fn test_verb_takes_filter_chaos_and_harness_args() {
        let cli = Cli::try_parse_from([
            "xtask",
            "test",
            "--chaos",
            "--filter",
            "splice",
            "--",
            "--nocapture",
        ])
        .expect("parses");
        let Verb::Test(args) = cli.verb else {
            panic!("parsed as {:?}", cli.verb);
        };
        assert!(args.chaos);
        assert_eq!(args.filter.as_deref(), Some("splice"));
        assert_eq!(args.harness_args, ["--nocapture"]);
    }

    #[test]
    fn bench_and_demo_pass_their_arguments_through() {
        let cli =
            Cli::try_parse_from(["xtask", "bench", "--quick", "--only", "rss"]).expect("parses");
        let Verb::Bench(pass) = cli.verb else {
            panic!("parsed as {:?}", cli.verb);
        };
        assert_eq!(pass.args, ["--quick", "--only", "rss"]);
        let cli = Cli::try_parse_from(["xtask", "demo"]).expect("parses");
        let Verb::Demo(pass) = cli.verb else {
            panic!("parsed as {:?}", cli.verb);
        };
        assert!(pass.args.is_empty());
        let cli = Cli::try_parse_from(["xtask", "demo", "--", "--help"]).expect("parses");
        let Verb::Demo(pass) = cli.verb else {
            panic!("parsed as {:?}", cli.verb);
        };
        assert_eq!(pass.args, ["--help"]);
    }

    #[test]
    fn fuzz_verb_takes_time_target_and_jobs() {
        let cli = Cli::try_parse_from([
            "xtask", "fuzz", "--time", "600", "--target", "config", "--jobs", "2",
        ])
        .expect("parses");
        let Verb::Fuzz(args) = cli.verb else {
            panic!("parsed as {:?}", cli.verb);
        };
        assert_eq!(
            (args.time, args.target.as_deref(), args.jobs),
            (600, Some("config"), 2)
        );
        let defaults = Cli::try_parse_from(["xtask", "fuzz"]).expect("parses");
        let Verb::Fuzz(args) = defaults.verb else {
            panic!("parsed as {:?}", defaults.verb);
        };
        assert_eq!(
            (args.time, args.target, args.jobs, args.merge),
            (60, None, 1, false)
        );
        assert!(Cli::try_parse_from(["xtask", "fuzz", "--target", "nope"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "fuzz", "--jobs", "0"]).is_err());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(420)), "0.4s");
        assert_eq!(human_duration(Duration::from_secs(73)), "73s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m05s");
    }
}
