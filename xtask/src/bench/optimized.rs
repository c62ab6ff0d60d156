//! The bench's own load generator and servers run inside xtask, and an
//! unoptimized build of them (what `cargo xtask` compiles) would throttle
//! the connection-rate and latency figures. So a debug xtask builds xtask
//! in release mode and hands over to it.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context as _, Result, bail};

use crate::cmd;
use crate::host::Host;

/// Whether this xtask binary was built without optimizations.
pub fn is_debug_build() -> bool {
    cfg!(debug_assertions)
}

/// Builds xtask with `--release` and replaces this process with it, running
/// the same command line. Returns only on failure.
pub fn reexec_release(host: &Host) -> Result<()> {
    println!("bench: building xtask in release mode for the load generator");
    let mut build = host.cargo();
    build.args([
        "build",
        "--release",
        "--package",
        "xtask",
        "--message-format=json-render-diagnostics",
    ]);
    let shown = cmd::describe(&build);
    println!("$ {shown}");
    let output = build
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    cmd::check(&shown, output.status)?;
    let exe = executable(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("`{shown}` reported no xtask executable"))?;
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    bail!("cannot run {}: {err}", exe.display())
}

/// The `xtask` binary among cargo's JSON messages.
fn executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "xtask")
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_xtask_executable() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"tokio"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"xtask"},"executable":"/w/target/release/xtask"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable(messages),
            Some(PathBuf::from("/w/target/release/xtask"))
        );
        assert_eq!(executable("{}"), None);
    }
}
