//! `tcpgate check-config` on the example config and on an administrator's
//! config, at the points of the install where it can say something true.
//!
//! check-config also checks that `[agent] operator_group` names a group that
//! exists. The example names `tcpgate-operators`, which install itself
//! creates: before that (and always when staging or filling an image, whose
//! accounts are not the host's), the group's line is checked with gid 0
//! instead, so everything else in the file is still checked. On the system
//! itself, once the accounts exist, the installed file is checked as is.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::files::Outcome;
use super::layout::{CONFIG, Layout, OPERATORS_GROUP, Target};

/// Runs `tcpgate check-config`; returns its success and stderr.
fn check_file(binary: &Path, config: &Path) -> Result<(bool, String)> {
    let output = Command::new(binary)
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr)
        .trim_end()
        .to_owned();
    Ok((output.status.success(), stderr))
}

fn host_has_group(name: &str) -> bool {
    Command::new("getent")
        .args(["group", name])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// `text` with the operators' group named by gid 0 when the group is not on
/// this host; says whether it changed anything.
fn without_missing_group(text: &str, host_has_it: bool) -> (String, bool) {
    let line = format!("operator_group = \"{OPERATORS_GROUP}\"");
    if host_has_it || !text.lines().any(|l| l.trim() == line) {
        return (text.to_owned(), false);
    }
    let replaced = text
        .lines()
        .map(|l| {
            if l.trim() == line {
                "operator_group = \"0\""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    (replaced, true)
}

/// Checks config text before the accounts exist; returns success, stderr
/// and whether the group line was stood in for.
fn check_text(binary: &Path, text: &[u8]) -> Result<(bool, String, bool)> {
    let text = String::from_utf8(text.to_vec()).context("the config is not UTF-8")?;
    let (text, stood_in) = without_missing_group(&text, host_has_group(OPERATORS_GROUP));
    let mut file = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .context("cannot write a temporary file")?;
    let (valid, stderr) = check_file(binary, file.path())?;
    Ok((valid, stderr, stood_in))
}

fn group_note(stood_in: bool) -> String {
    if stood_in {
        format!(" ({OPERATORS_GROUP}, which install creates, checked as gid 0)")
    } else {
        String::new()
    }
}

/// The example must pass before anything is written: a broken one would be
/// installed once and then kept forever.
pub fn check_example(binary: &Path, example: &[u8]) -> Result<()> {
    let (valid, stderr, stood_in) = check_text(binary, example)?;
    if !valid {
        bail!("packaging/tcpgate.toml does not pass `tcpgate check-config`:\n{stderr}");
    }
    println!(
        "install: the example config passes `tcpgate check-config`{}",
        group_note(stood_in)
    );
    Ok(())
}

/// After the files (and on the system, the accounts) are in place: the
/// installed config must pass, and an administrator's existing one is
/// reported on, because a new binary may reject what an old one accepted.
pub fn check_installed(binary: &Path, layout: &Layout, outcome: Outcome) -> Result<()> {
    let config = layout.on_disk(Path::new(CONFIG));
    let (valid, stderr, note) = if layout.target == Target::System {
        let (valid, stderr) = check_file(binary, &config)?;
        (valid, stderr, String::new())
    } else if outcome == Outcome::Kept {
        let text = std::fs::read(&config).with_context(|| format!("cannot read {CONFIG}"))?;
        let (valid, stderr, stood_in) = check_text(binary, &text)?;
        (valid, stderr, group_note(stood_in))
    } else {
        // The example, checked before it was written.
        return Ok(());
    };
    match (valid, outcome) {
        (true, _) => println!("install: {CONFIG} passes `tcpgate check-config`{note}"),
        (false, Outcome::Kept) => println!(
            "install: WARNING: the existing {CONFIG} does not pass `tcpgate check-config` \
             with the new binary; the agent will not start until it is fixed:\n{stderr}"
        ),
        (false, _) => {
            bail!("the installed {CONFIG} does not pass `tcpgate check-config`:\n{stderr}")
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_operators_group_line_is_stood_in_for_and_only_when_missing() {
        let text = "[agent]\noperator_group = \"tcpgate-operators\"\npin_dir = \"/x\"\n";
        let (missing, changed) = without_missing_group(text, false);
        assert!(changed);
        assert_eq!(missing, "[agent]\noperator_group = \"0\"\npin_dir = \"/x\"");
        assert_eq!(without_missing_group(text, true), (text.to_owned(), false));
        let other = "[agent]\noperator_group = \"wheel\"\n";
        assert_eq!(
            without_missing_group(other, false),
            (other.to_owned(), false)
        );
    }
}
