//! `cargo xtask build`: the tcpgate binary, with its embedded eBPF object.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::cmd;
use crate::host::Host;
use crate::setup;

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Build with the release profile (target/release/tcpgate).
    #[arg(long)]
    pub release: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

pub fn run(host: &Host, args: &BuildArgs) -> Result<()> {
    setup::ensure(host)?;
    let profile = if args.release {
        Profile::Release
    } else {
        Profile::Debug
    };
    let binary = tcpgate_binary(host, profile)?;
    println!("build: tcpgate is at {}", binary.display());
    Ok(())
}

/// Builds the `tcpgate` binary (cargo does nothing if it is up to date) and
/// returns its absolute path. Run `setup::ensure` first: the build needs
/// bpf-linker and rust-src.
pub fn tcpgate_binary(host: &Host, profile: Profile) -> Result<PathBuf> {
    let mut args = vec!["build", "--package", "proxy-userspace", "--bins"];
    if profile == Profile::Release {
        args.push("--release");
    }
    build_executable(host, &args, "tcpgate")
}

/// Runs `cargo ARGS` and returns where cargo put binary target `bin`.
pub fn build_executable(host: &Host, args: &[&str], bin: &str) -> Result<PathBuf> {
    let [path] = build_executables(host, args, [bin])?;
    Ok(path)
}

/// Builds the tcpgate binary and `tcpgate-bench` in one cargo run (their
/// shared dependencies resolve to one feature set, so they build once).
pub fn tcpgate_and_bench(host: &Host, profile: Profile) -> Result<[PathBuf; 2]> {
    let mut args = vec![
        "build",
        "--package",
        "proxy-userspace",
        "--bins",
        "--package",
        "tcpgate-bench",
    ];
    if profile == Profile::Release {
        args.push("--release");
    }
    build_executables(host, &args, ["tcpgate", "tcpgate-bench"])
}

/// Runs `cargo ARGS` and returns where cargo put each binary target of
/// `bins`, in order.
fn build_executables<const N: usize>(
    host: &Host,
    args: &[&str],
    bins: [&str; N],
) -> Result<[PathBuf; N]> {
    let mut build = host.cargo();
    build.args(args);
    // Ask cargo where it put the binary rather than guessing the target
    // directory (CARGO_TARGET_DIR, build.target-dir...). Diagnostics still
    // reach the terminal, rendered, on stderr.
    build.arg("--message-format=json-render-diagnostics");
    let shown = cmd::describe(&build);
    println!("$ {shown}");
    let output = build
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    cmd::check(&shown, output.status)?;
    let messages = String::from_utf8_lossy(&output.stdout);
    let mut found = Vec::with_capacity(N);
    for bin in bins {
        found.push(
            executable_from_messages(&messages, bin).with_context(|| {
                format!("`{shown}` succeeded but reported no `{bin}` executable")
            })?,
        );
    }
    found
        .try_into()
        .map_err(|_| anyhow::anyhow!("one executable per binary target"))
}

/// Picks the executable of binary target `bin` out of cargo's JSON messages.
fn executable_from_messages(messages: &str, bin: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter(|msg| msg["target"]["name"] == bin)
        .filter(|msg| {
            msg["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"))
        })
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bin_executable_among_other_artifacts() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"tcpgate","kind":["lib"]},"executable":null}
{"reason":"build-script-executed","package_id":"x"}
{"reason":"compiler-artifact","target":{"name":"tcpgate","kind":["bin"]},"executable":"/w/target/debug/tcpgate"}
{"reason":"compiler-artifact","target":{"name":"other","kind":["bin"]},"executable":"/w/target/debug/other"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(messages, "tcpgate"),
            Some(PathBuf::from("/w/target/debug/tcpgate"))
        );
    }

    #[test]
    fn no_bin_artifact_gives_none() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"tcpgate","kind":["lib"]},"executable":null}
not json at all"#;
        assert_eq!(executable_from_messages(messages, "tcpgate"), None);
    }
}
