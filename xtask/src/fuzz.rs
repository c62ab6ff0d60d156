//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` on nightly,
//! each for a fixed time, from the committed corpus and dictionary, and
//! sums up coverage and speed per target. A crash fails the run, naming the
//! artifact and the command that reproduces it.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::cmd;
use crate::host::Host;

mod stats;
use stats::Stats;

/// The fuzz targets, in the order they run.
pub const TARGETS: [&str; 4] = ["preamble", "token_claims", "config", "grant_api_body"];

/// Longest input libFuzzer may build, where its 4096-byte default would
/// stop short of a limit under test: a preamble or token may be 16 KiB.
fn max_len(target: &str) -> Option<usize> {
    match target {
        "preamble" | "token_claims" => Some(16 * 1024 + 64),
        _ => None,
    }
}

#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// How long to fuzz each target, in seconds (libFuzzer -max_total_time).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub time: u64,
    /// Fuzz only this target (default: all, one after the other).
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// libFuzzer processes per target (cargo fuzz --jobs, libFuzzer -fork).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,
    /// Afterwards, add the new inputs that reach new code edges to
    /// fuzz/corpus/<target> (libFuzzer -set_cover_merge=1 -use_counters=0; the seeds
    /// stay). The full set stays in fuzz/target/corpus-work/<target>.
    #[arg(long)]
    pub merge: bool,
}

/// One target's result, for the summary.
struct Outcome {
    target: &'static str,
    seeds: usize,
    stats: Stats,
    crashed: bool,
    corpus_after_merge: Option<usize>,
    log: PathBuf,
}

pub fn run(host: &Host, args: &FuzzArgs) -> Result<()> {
    let fuzz_dir = host.workspace.join("fuzz");
    ensure_tools(host)?;
    let targets: Vec<&'static str> = TARGETS
        .into_iter()
        .filter(|t| args.target.as_deref().is_none_or(|want| want == *t))
        .collect();
    let logs = fuzz_dir.join("target/xtask-fuzz");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut outcomes = Vec::new();
    for target in targets {
        let outcome = fuzz_one(host, args, &fuzz_dir, &logs, target)?;
        let crashed = outcome.crashed;
        outcomes.push(outcome);
        if crashed {
            break;
        }
    }
    print_summary(&outcomes, args.time);
    if let Some(bad) = outcomes.iter().find(|o| o.crashed) {
        let artifact = bad
            .stats
            .artifact
            .as_deref()
            .unwrap_or("fuzz/artifacts/<target>/crash-*");
        bail!(
            "fuzz target `{t}` crashed; input: {artifact} (log: {log})\n  reproduce: \
             cargo +nightly fuzz run {t} {artifact}\n  minimize:  cargo +nightly fuzz tmin {t} \
             {artifact}\n  then commit the minimized input as fuzz/regressions/{t}/<name> with its \
             verdict in <name>.expected",
            t = bad.target,
            log = bad.log.display(),
        );
    }
    Ok(())
}

/// nightly (never downloaded here), its rust-src, cargo-fuzz and bpf-linker.
fn ensure_tools(host: &Host) -> Result<()> {
    let nightly = cmd::read(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]))
        .context(
            "the nightly toolchain is missing; cargo-fuzz needs it for the sanitizers. Install it \
             with `rustup toolchain install nightly --profile minimal`, then run this again",
        )?;
    println!("fuzz: nightly toolchain ... found ({})", nightly.trim());
    let components = cmd::read(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    // The eBPF object embedded in tcpgate is built with -Z build-std=core.
    if components.lines().any(|c| c.starts_with("rust-src")) {
        println!("fuzz: rust-src for nightly ... found");
    } else {
        println!("fuzz: rust-src for nightly ... installing");
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let fuzz_version = || cmd::read(host.cargo().args(["fuzz", "--version"]));
    match fuzz_version() {
        Ok(v) => println!("fuzz: cargo-fuzz ... found ({})", v.trim()),
        Err(_) => {
            println!("fuzz: cargo-fuzz ... not found, installing");
            cmd::run(host.cargo().args(["install", "cargo-fuzz", "--locked"]))?;
            let v = fuzz_version().context("cargo-fuzz does not run after installing it")?;
            println!("fuzz: cargo-fuzz ... installed ({})", v.trim());
        }
    }
    match host.find_program("bpf-linker") {
        Some(path) => println!("fuzz: bpf-linker ... found ({})", path.display()),
        None => {
            bail!("bpf-linker is missing (tcpgate embeds an eBPF object); run `cargo xtask setup`")
        }
    }
    Ok(())
}

/// `rustup run nightly cargo fuzz <args>` from the workspace root, without
/// the variables `cargo run` set for xtask itself (they name stable).
fn cargo_fuzz(host: &Host) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(&host.workspace)
        .env("PATH", &host.child_path)
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    c
}

fn fuzz_one(
    host: &Host,
    args: &FuzzArgs,
    fuzz_dir: &Path,
    logs: &Path,
    target: &'static str,
) -> Result<Outcome> {
    let corpus = fuzz_dir.join("corpus").join(target);
    let seeds = count_files(&corpus);
    // New inputs go to a scratch corpus, so fuzzing never floods git.
    let work = fuzz_dir.join("target/corpus-work").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    println!("fuzz: {target}: {seeds} seeds, {}s", args.time);
    let mut run = cargo_fuzz(host);
    run.args(["run", target]).arg(&work).arg(&corpus);
    run.args(["--jobs", &args.jobs.to_string(), "--"]);
    run.arg(format!("-max_total_time={}", args.time))
        .arg("-print_final_stats=1")
        // Any input this slow is a finding; libFuzzer's default is 20 minutes.
        .arg("-timeout=10");
    if let Some(len) = max_len(target) {
        run.arg(format!("-max_len={len}"));
    }
    let dict = fuzz_dir.join("dict").join(format!("{target}.dict"));
    if dict.is_file() {
        run.arg(format!("-dict={}", dict.display()));
    }
    let log = logs.join(format!("{target}.log"));
    let started = Instant::now();
    let (ok, stats) = run_logged(&mut run, &log)?;
    println!("fuzz: {target}: finished in {}", crate::took(started));
    let crashed = !ok;
    let corpus_after_merge = if args.merge && !crashed {
        let mut merge = cargo_fuzz(host);
        merge.args(["run", target]).arg(&corpus).arg(&work);
        // Greedy set cover over edges (no hit counts) keeps the committed
        // corpus small; the scratch corpus keeps the rest.
        merge.args(["--", "-set_cover_merge=1", "-use_counters=0"]);
        if let Some(len) = max_len(target) {
            merge.arg(format!("-max_len={len}"));
        }
        let (merged, _) = run_logged(&mut merge, &logs.join(format!("{target}.merge.log")))?;
        if !merged {
            bail!(
                "merging the new inputs of {target} into {} failed",
                corpus.display()
            );
        }
        Some(count_files(&corpus))
    } else {
        None
    };
    Ok(Outcome {
        target,
        seeds,
        stats,
        crashed,
        corpus_after_merge,
        log,
    })
}

/// Runs `command` with its output in `log`, echoing all but libFuzzer's
/// per-input lines, and reads the stats. Only a command that cannot start
/// is an error; the bool says whether it succeeded.
fn run_logged(command: &mut Command, log: &Path) -> Result<(bool, Stats)> {
    let shown = cmd::describe(command);
    println!("$ {shown}");
    let mut file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    // libFuzzer and cargo write to stderr; one pipe keeps the order.
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(writer.try_clone().context("duplicating a pipe")?)
        .stderr(writer)
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    // The command still holds the write ends; ours must close for EOF to come.
    command.stdout(Stdio::null()).stderr(Stdio::null());
    let mut stats = Stats::default();
    let mut out = std::io::stdout();
    for line in BufReader::new(reader).lines() {
        let line = line.context("reading the fuzzer's output")?;
        writeln!(file, "{line}").with_context(|| format!("writing {}", log.display()))?;
        stats.read_line(&line);
        if !is_per_input_line(&line) {
            writeln!(out, "{line}").context("writing to stdout")?;
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    Ok((status.success(), stats))
}

/// `#123 NEW cov: ...` and `#123 REDUCE ...`: one per interesting input,
/// thousands per run; and the entries of libFuzzer's recommended
/// dictionary (`"ab" # Uses: 3`). The log keeps them.
fn is_per_input_line(line: &str) -> bool {
    (line.starts_with('#')
        && [" NEW ", " REDUCE ", "\tNEW ", "\tREDUCE "]
            .iter()
            .any(|w| line.contains(w)))
        || (line.starts_with('"') && line.contains("\" # Uses: "))
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
            .count()
    })
}

fn print_summary(outcomes: &[Outcome], seconds: u64) {
    let show = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    println!("\nfuzz: summary ({seconds}s per target)");
    println!(
        "{:<16} {:>7} {:>12} {:>8} {:>6} {:>7} {:>6} {:>18} {:>7}",
        "target", "result", "execs", "exec/s", "cov", "ft", "seeds", "corpus (start-end)", "merged"
    );
    for o in outcomes {
        println!(
            "{:<16} {:>7} {:>12} {:>8} {:>6} {:>7} {:>6} {:>18} {:>7}",
            o.target,
            if o.crashed { "CRASH" } else { "ok" },
            show(o.stats.execs),
            show(o.stats.exec_per_sec),
            show(o.stats.cov),
            show(o.stats.ft),
            o.seeds,
            format!(
                "{}-{}",
                show(o.stats.corpus_start),
                show(o.stats.corpus_end)
            ),
            o.corpus_after_merge
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_input_lines_are_told_apart() {
        assert!(is_per_input_line(
            "#57\tNEW    cov: 420 ft: 530 corp: 17/1299b"
        ));
        assert!(is_per_input_line(
            "#90\tREDUCE cov: 420 ft: 530 corp: 17/1200b"
        ));
        assert!(!is_per_input_line("#131072\tpulse  cov: 501 ft: 1210"));
        assert!(!is_per_input_line("#2\tINITED cov: 412 ft: 515"));
        assert!(is_per_input_line(r#""\001\000" # Uses: 21"#));
        assert!(!is_per_input_line("###### Recommended dictionary. ######"));
    }

    #[test]
    fn the_targets_have_corpora_and_sources() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        for t in TARGETS {
            assert!(fuzz.join(format!("fuzz_targets/{t}.rs")).is_file(), "{t}");
            assert!(count_files(&fuzz.join("corpus").join(t)) > 0, "{t}");
        }
    }
}
