//! `cargo xtask test`: formatting, then every test of the workspace,
//! including the privileged integration tests, which must not be skipped.

use std::io::{BufRead as _, BufReader, IsTerminal as _, Write as _};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::build::{self, Profile};
use crate::cmd;
use crate::host::Host;
use crate::setup;

#[derive(Args, Debug)]
pub struct TestArgs {
    /// Run the chaos tests at full size (sets TCPGATE_CHAOS=1), against a
    /// release build of the agent.
    #[arg(long)]
    pub chaos: bool,
    /// Run only the tests whose name contains NAME.
    #[arg(long, value_name = "NAME")]
    pub filter: Option<String>,
    /// Extra arguments for the test harness, e.g. `-- --nocapture`.
    #[arg(last = true, value_name = "HARNESS_ARGS")]
    pub harness_args: Vec<String>,
}

/// Totals summed over every `test result:` line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

pub fn run(host: &Host, args: &TestArgs) -> Result<()> {
    if !host.is_root {
        bail!(
            "cargo xtask test runs privileged integration tests (network namespaces, eBPF) \
             and must run as root; plain `cargo test` runs the unit tests only"
        );
    }
    let started = Instant::now();
    setup::ensure(host)?;

    println!("test: checking formatting");
    let fmt = cmd::status(host.cargo().args(["fmt", "--all", "--", "--check"]))?;
    if !fmt.success() {
        println!("test: formatting check FAILED (run `cargo fmt --all`); running the tests anyway");
    }

    // Warnings fail the run, as formatting does: every target the tests
    // build (the eBPF crate builds only for the bpf target).
    println!("test: clippy (warnings are errors)");
    let clippy = cmd::status(host.cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    if !clippy.success() {
        println!("test: clippy FAILED; running the tests anyway");
    }

    println!("test: shellcheck scripts/*.sh");
    let shellcheck = shellcheck(host)?;
    if !shellcheck.success() {
        println!("test: shellcheck FAILED; running the tests anyway");
    }

    // The full chaos run measures what operators get (throughput under a
    // junk flood, agent CPU and memory), so it runs the release agent: a
    // debug agent spends about twice the CPU per refused connection. The
    // ordinary run keeps the debug build and its overflow checks.
    let profile = if args.chaos {
        Profile::Release
    } else {
        Profile::Debug
    };
    let tcpgate = build::tcpgate_binary(host, profile)?;
    let mut cargo_test = host.cargo();
    cargo_test
        .args([
            "test",
            "--workspace",
            "--exclude",
            "proxy-ebpf",
            "--no-fail-fast",
        ])
        .env("TCPGATE_BIN", &tcpgate)
        // The install tests run `xtask install`: this very binary.
        .env(
            "TCPGATE_XTASK_BIN",
            std::env::current_exe().context("cannot find xtask's own executable")?,
        )
        .env("TCPGATE_PRIVILEGED_TESTS", "required");
    if args.chaos {
        cargo_test.env("TCPGATE_CHAOS", "1");
    } else {
        cargo_test.env_remove("TCPGATE_CHAOS");
    }
    cargo_test.arg("--");
    cargo_test.args(&args.filter);
    // Our pipe hides the terminal from the harness; keep its colours.
    if std::io::stdout().is_terminal() {
        cargo_test.args(["--color", "always"]);
    }
    cargo_test.args(&args.harness_args);
    let (tests, counts) = run_and_count(&mut cargo_test)?;

    println!("test: formatting   {}", verdict(fmt));
    println!("test: clippy       {}", verdict(clippy));
    println!("test: shellcheck   {}", verdict(shellcheck));
    println!("test: cargo test   {}", verdict(tests));
    println!("test: wall time    {}", crate::took(started));
    // The last line, in the plain `N passed, N failed` form CI reads.
    println!(
        "test: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    let failed: Vec<&str> = [
        ("the formatting check", fmt),
        ("clippy", clippy),
        ("shellcheck", shellcheck),
        ("cargo test", tests),
    ]
    .into_iter()
    .filter(|(_, status)| !status.success())
    .map(|(step, _)| step)
    .collect();
    if !failed.is_empty() {
        bail!("{} failed", failed.join(" and "));
    }
    Ok(())
}

/// The operator's scripts are POSIX sh (`-s sh`), so bashisms are errors.
fn shellcheck(host: &Host) -> Result<ExitStatus> {
    let dir = host.workspace.join("scripts");
    let mut scripts = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "sh") {
            scripts.push(path);
        }
    }
    scripts.sort();
    cmd::status(Command::new("shellcheck").args(["-s", "sh"]).args(&scripts))
}

fn verdict(status: ExitStatus) -> String {
    if status.success() {
        "ok".to_owned()
    } else {
        format!("FAILED ({status})")
    }
}

/// Runs `cargo test`, passing its output through while adding up the
/// harness' result lines. Only a run that cannot start is an error.
fn run_and_count(cargo_test: &mut Command) -> Result<(ExitStatus, Counts)> {
    let shown = cmd::describe(cargo_test);
    println!("$ {shown}");
    let mut child = cargo_test
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let stdout = child
        .stdout
        .take()
        .context("cargo test has no stdout pipe")?;
    let mut counts = Counts::default();
    let mut out = std::io::stdout().lock();
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .context("reading cargo test's output")?
            == 0
        {
            break;
        }
        out.write_all(&line).context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
        if let Some(result) = parse_test_result(&String::from_utf8_lossy(&line)) {
            counts.passed += result.passed;
            counts.failed += result.failed;
            counts.ignored += result.ignored;
        }
    }
    drop(out);
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    Ok((status, counts))
}

/// Reads libtest's summary line, e.g. `test result: ok. 3 passed; 0 failed;
/// 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
pub fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_status, fields) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    for field in fields.split(';') {
        let mut words = field.split_whitespace();
        let (Some(number), Some(word)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(number) = number.parse::<u64>() else {
            continue;
        };
        match word {
            "passed" => counts.passed = number,
            "failed" => counts.failed = number,
            "ignored" => counts.ignored = number,
            _ => {}
        }
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_ok_summary() {
        let line = "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; \
                    0 filtered out; finished in 0.01s\n";
        assert_eq!(
            parse_test_result(line),
            Some(Counts {
                passed: 3,
                failed: 0,
                ignored: 1
            })
        );
    }

    #[test]
    fn parses_a_failed_summary() {
        let line = "test result: FAILED. 7 passed; 2 failed; 0 ignored; 0 measured; \
                    0 filtered out; finished in 1.20s";
        assert_eq!(
            parse_test_result(line),
            Some(Counts {
                passed: 7,
                failed: 2,
                ignored: 0
            })
        );
    }

    #[test]
    fn other_lines_are_not_summaries() {
        assert_eq!(parse_test_result("test tests::it_works ... ok"), None);
        assert_eq!(parse_test_result("running 3 tests"), None);
        assert_eq!(parse_test_result(""), None);
    }
}
