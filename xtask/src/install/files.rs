//! Writing and removing installed files, idempotently, saying what happened.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::{Context as _, Result};

/// What one step did to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Installed,
    Updated,
    Unchanged,
    /// An existing file the administrator owns (the config) was left alone.
    Kept,
    Removed,
    Absent,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Installed => "installed",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
            Self::Kept => "kept (exists; not overwritten)",
            Self::Removed => "removed",
            Self::Absent => "not present",
        })
    }
}

/// Prints one line per path, in a form that a log or a test can read:
/// `install: <path> ... <outcome>`.
pub fn report(verb: &str, path: &Path, outcome: Outcome) {
    println!("{verb}: {} ... {outcome}", path.display());
}

/// Makes `path` hold `content` with `mode`. Writes only when the content or
/// the mode differ, through a temporary file and a rename, so a running
/// binary is replaced rather than modified (no ETXTBSY, no torn file).
pub fn put(path: &Path, content: &[u8], mode: u32) -> Result<Outcome> {
    let existing = match fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if let Some(bytes) = &existing {
        let current_mode = fs::metadata(path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .permissions()
            .mode()
            & 0o7777;
        if bytes == content && current_mode == mode {
            return Ok(Outcome::Unchanged);
        }
    }
    write_atomically(path, content, mode)?;
    Ok(if existing.is_some() {
        Outcome::Updated
    } else {
        Outcome::Installed
    })
}

/// Writes `content` only if nothing is at `path` yet: the administrator's
/// edits always win.
pub fn put_if_missing(path: &Path, content: &[u8], mode: u32) -> Result<Outcome> {
    if path.symlink_metadata().is_ok() {
        return Ok(Outcome::Kept);
    }
    write_atomically(path, content, mode)?;
    Ok(Outcome::Installed)
}

fn write_atomically(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Next to the target, so the rename stays on one filesystem; removed on
    // drop if anything fails before it.
    let mut temp = tempfile::Builder::new()
        .prefix(".xtask-install-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    temp.write_all(content)
        .and_then(|()| {
            temp.as_file()
                .set_permissions(fs::Permissions::from_mode(mode))
        })
        .and_then(|()| temp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    temp.persist(path)
        .with_context(|| format!("cannot move the new file into place at {}", path.display()))?;
    Ok(())
}

/// Removes a file; a missing one is fine.
pub fn remove(path: &Path) -> Result<Outcome> {
    match fs::remove_file(path) {
        Ok(()) => Ok(Outcome::Removed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Outcome::Absent),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Removes a directory and everything in it; a missing one is fine.
pub fn remove_tree(path: &Path) -> Result<Outcome> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(Outcome::Removed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Outcome::Absent),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o7777
    }

    #[test]
    fn put_installs_then_leaves_alone_then_updates_content_and_mode() {
        let dir = scratch("put");
        let file = dir.join("sub/tool");
        assert_eq!(put(&file, b"v1", 0o755).expect("put"), Outcome::Installed);
        assert_eq!(mode(&file), 0o755);
        assert_eq!(put(&file, b"v1", 0o755).expect("put"), Outcome::Unchanged);
        assert_eq!(put(&file, b"v2", 0o755).expect("put"), Outcome::Updated);
        assert_eq!(fs::read(&file).expect("read"), b"v2");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o700)).expect("chmod");
        assert_eq!(put(&file, b"v2", 0o755).expect("put"), Outcome::Updated);
        assert_eq!(mode(&file), 0o755);
        let leftovers: Vec<_> = fs::read_dir(dir.join("sub"))
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(leftovers, ["tool"], "no temporary files left behind");
    }

    #[test]
    fn put_if_missing_never_overwrites() {
        let dir = scratch("keep");
        let file = dir.join("tcpgate.toml");
        assert_eq!(
            put_if_missing(&file, b"example", 0o644).expect("put"),
            Outcome::Installed
        );
        fs::write(&file, b"edited").expect("edit");
        assert_eq!(
            put_if_missing(&file, b"example", 0o644).expect("put"),
            Outcome::Kept
        );
        let content = fs::read(&file).expect("read");
        fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(content, b"edited");
    }

    #[test]
    fn removing_twice_reports_absent() {
        let dir = scratch("rm");
        fs::create_dir_all(dir.join("tree/inner")).expect("mkdir");
        fs::write(dir.join("file"), b"x").expect("write");
        assert_eq!(remove(&dir.join("file")).expect("rm"), Outcome::Removed);
        assert_eq!(remove(&dir.join("file")).expect("rm"), Outcome::Absent);
        assert_eq!(
            remove_tree(&dir.join("tree")).expect("rm"),
            Outcome::Removed
        );
        assert_eq!(remove_tree(&dir.join("tree")).expect("rm"), Outcome::Absent);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
