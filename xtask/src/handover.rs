//! `cargo xtask bench` and `cargo xtask demo`: setup, build, then hand over
//! to the `tcpgate-bench` binary (crate `bench/`), which does the work.
//!
//! xtask stays std + clap + anyhow: the bench and the demo need tokio,
//! JWT signing and the testkit, which must not have to compile before
//! `cargo xtask setup` has installed anything.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};
use clap::Args;

use crate::build::{self, Profile};
use crate::cmd;
use crate::host::Host;
use crate::setup;

/// Arguments handed to `tcpgate-bench bench|demo` unchanged.
#[derive(Args, Debug)]
pub struct PassArgs {
    /// Passed to tcpgate-bench unchanged (after `--` too).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

/// The `tcpgate-bench` subcommand run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Bench,
    Demo,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Bench => "bench",
            Verb::Demo => "demo",
        }
    }

    /// The bench measures a release agent with an optimized load
    /// generator; the demo shows the debug build `cargo xtask test` uses.
    fn profile(self) -> Profile {
        match self {
            Verb::Bench => Profile::Release,
            Verb::Demo => Profile::Debug,
        }
    }
}

/// Whether the arguments ask for help only: then nothing else is built
/// and no root is needed.
fn wants_help(args: &[OsString]) -> bool {
    args.iter().any(|arg| arg == "--help" || arg == "-h")
}

/// Runs setup, builds tcpgate and tcpgate-bench, and replaces this process
/// with `tcpgate-bench VERB ARGS` (TCPGATE_BIN set), so its exit code and
/// its handling of Ctrl-C are the command's own. Returns only on failure.
pub fn run(host: &Host, verb: Verb, args: &PassArgs) -> Result<()> {
    if wants_help(&args.args) {
        let exe = build::build_executable(
            host,
            &["build", "--package", "tcpgate-bench"],
            "tcpgate-bench",
        )?;
        return exec(Command::new(exe).arg(verb.name()).args(&args.args));
    }
    if !host.is_root {
        bail!(
            "`cargo xtask {}` creates network namespaces and loads eBPF programs: run it as root",
            verb.name()
        );
    }
    setup::ensure(host)?;
    if verb.profile() == Profile::Release {
        println!(
            "{}: building the agent and tcpgate-bench in release mode",
            verb.name()
        );
    }
    let [tcpgate, bench] = build::tcpgate_and_bench(host, verb.profile())?;
    exec(
        Command::new(bench)
            .arg(verb.name())
            .args(&args.args)
            .env("TCPGATE_BIN", &tcpgate)
            .env("PATH", &host.child_path)
            // Results go to <workspace>/target/bench by default.
            .current_dir(&host.workspace),
    )
}

fn exec(command: &mut Command) -> Result<()> {
    println!("$ {}", cmd::describe(command));
    let err = command.exec();
    bail!(
        "cannot run {}: {err}",
        Path::new(command.get_program()).display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_recognised_among_the_args() {
        let args = |words: &[&str]| words.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(wants_help(&args(&["--quick", "--help"])));
        assert!(wants_help(&args(&["-h"])));
        assert!(!wants_help(&args(&["--quick", "--only", "rss"])));
        assert!(!wants_help(&args(&["--helpful"])));
    }
}
