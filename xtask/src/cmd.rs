//! Running child processes: echo what runs, and name the command that failed.

use std::ffi::OsStr;
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context as _, Result, bail};

/// Renders a command the way a person would type it, with the environment
/// variables we set in front. PATH is left out: it is long, and always ours.
pub fn describe(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value
            && key != "PATH"
        {
            words.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn quote(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Echoes `cmd`, runs it with our stdin/stdout/stderr, and fails unless it
/// exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    check(&describe(cmd), status)
}

/// Echoes `cmd` and runs it with our stdin/stdout/stderr; only a command
/// that cannot start is an error.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    let shown = describe(cmd);
    println!("$ {shown}");
    cmd.status()
        .with_context(|| format!("could not start `{shown}`"))
}

/// Turns a non-zero exit into an error that names the command.
pub fn check(shown: &str, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("`{shown}` failed ({status})")
    }
}

/// Runs `cmd` quietly (it is a probe, not a step worth echoing) and returns
/// its stdout. A failure carries the command's stderr.
pub fn read(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!("`{shown}` failed ({}): {}", output.status, stderr.trim());
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_shows_set_variables_but_not_path_and_quotes_odd_words() {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", "--version", "^0.13", "two words"])
            .env("LLVM_PREFIX", "/opt/llvm")
            .env("PATH", "/very/long:/path");
        assert_eq!(
            describe(&cmd),
            "LLVM_PREFIX=/opt/llvm cargo install --version ^0.13 'two words'"
        );
    }

    #[test]
    fn quote_escapes_single_quotes() {
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
    }

    #[test]
    fn read_reports_the_failing_command_and_its_stderr() {
        let err = read(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .expect_err("exit 3 must be an error");
        let text = format!("{err:#}");
        assert!(
            text.contains("`sh -c 'echo oops >&2; exit 3'` failed"),
            "{text}"
        );
        assert!(text.contains("oops"), "{text}");
    }

    #[test]
    fn read_returns_stdout() {
        let out = read(Command::new("sh").args(["-c", "echo hello"])).expect("sh runs");
        assert_eq!(out, "hello\n");
    }
}
