//! Checks on a staged tree: which files, with which modes, and whether the
//! generated completions and man pages work.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use super::{PREFIX, Staged};

pub fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// Every regular file under `dir`, relative to it, as `/path`.
pub fn files_under(dir: &Path) -> Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path.strip_prefix(dir)?.display().to_string();
                found.insert(format!("/{relative}"));
            }
        }
    }
    Ok(found)
}

/// Every file install writes, with its mode (plus one man page per verb).
pub fn staged_files() -> Vec<(String, u32)> {
    let mut files: Vec<(String, u32)> = [
        ("/bin/tcpgate", 0o755),
        ("/lib/systemd/system/tcpgate.service", 0o644),
        ("/lib/systemd/system/tcpgate-bpffs.service", 0o644),
        ("/lib/sysusers.d/tcpgate.conf", 0o644),
        ("/lib/tmpfiles.d/tcpgate.conf", 0o644),
        ("/share/bash-completion/completions/tcpgate", 0o644),
        ("/share/zsh/site-functions/_tcpgate", 0o644),
        ("/share/fish/vendor_completions.d/tcpgate.fish", 0o644),
        ("/share/man/man1/tcpgate.1", 0o644),
        ("/share/man/man1/tcpgate-run.1", 0o644),
        ("/share/man/man1/tcpgate-check-config.1", 0o644),
    ]
    .iter()
    .map(|(path, mode)| (format!("{PREFIX}{path}"), *mode))
    .collect();
    files.push(("/etc/tcpgate/tcpgate.toml".to_owned(), 0o644));
    files
}

/// The completions load (bash) or have their headers (zsh, fish), and the
/// man pages render without warnings.
pub fn check_completions_and_man_pages(staged: &Staged) -> Result<()> {
    let bash = staged.path(&format!(
        "{PREFIX}/share/bash-completion/completions/tcpgate"
    ));
    let registered = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p tcpgate", bash.display()))
        .output()?;
    ensure!(
        String::from_utf8_lossy(&registered.stdout).contains("-F _tcpgate tcpgate"),
        "bash completion registers for tcpgate: {}",
        String::from_utf8_lossy(&registered.stderr)
    );
    let zsh = std::fs::read_to_string(
        staged.path(&format!("{PREFIX}/share/zsh/site-functions/_tcpgate")),
    )?;
    ensure!(zsh.starts_with("#compdef tcpgate"), "zsh completion header");
    let fish = std::fs::read_to_string(staged.path(&format!(
        "{PREFIX}/share/fish/vendor_completions.d/tcpgate.fish"
    )))?;
    ensure!(fish.contains("complete -c tcpgate"), "fish completion");
    for page in ["tcpgate.1", "tcpgate-run.1"] {
        let path = staged.path(&format!("{PREFIX}/share/man/man1/{page}"));
        let rendered = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .output()?;
        let warnings = String::from_utf8_lossy(&rendered.stderr);
        ensure!(
            rendered.status.success() && warnings.trim().is_empty(),
            "man {page}: {warnings}"
        );
        ensure!(String::from_utf8_lossy(&rendered.stdout).contains("SYNOPSIS"));
    }
    Ok(())
}

/// Lines of an install's output that changed something.
pub fn changes(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| {
            l.ends_with("... installed") || l.ends_with("... updated") || l.ends_with("... removed")
        })
        .collect()
}
