//! The pins of an agent that was taken over. Its successor pins its own
//! maps under the pin directory's names, so on a takeover the old agent
//! first moves its pinned maps into `<pin_dir>/draining-<pid>/`: operators
//! keep seeing the sessions it drains (`tcpgate sessions`), and it removes
//! the directory when it exits. One left by a killed agent is removed by
//! the next agent to start.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::bpf::PINNED;

const PREFIX: &str = "draining-";

/// Where the agent `pid` keeps its pins while it drains.
#[must_use]
pub fn dir(pin_dir: &Path, pid: u32) -> PathBuf {
    pin_dir.join(format!("{PREFIX}{pid}"))
}

/// Moves the pinned maps into the draining directory, which gets the pin
/// directory's group and mode (an operator group keeps its access).
pub fn move_aside(pin_dir: &Path, pid: u32) -> io::Result<PathBuf> {
    let to = dir(pin_dir, pid);
    let meta = std::fs::metadata(pin_dir)?;
    match std::fs::create_dir(&to) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    nix::unistd::chown(&to, None, Some(nix::unistd::Gid::from_raw(meta.gid())))?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    rename_all(pin_dir, &to)?;
    Ok(to)
}

/// Moves them back (the successor gave up before pinning its own).
pub fn move_back(pin_dir: &Path, pid: u32) -> io::Result<()> {
    let from = dir(pin_dir, pid);
    rename_all(&from, pin_dir)?;
    std::fs::remove_dir(from)
}

fn rename_all(from: &Path, to: &Path) -> io::Result<()> {
    for (_, file) in PINNED {
        match std::fs::rename(from.join(file), to.join(file)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes the draining directory of `pid` and its pins.
pub fn remove(pin_dir: &Path, pid: u32) -> io::Result<()> {
    let dir = dir(pin_dir, pid);
    for (_, file) in PINNED {
        match std::fs::remove_file(dir.join(file)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match std::fs::remove_dir(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The draining directories under `pin_dir`, with their agents' pids.
#[must_use]
pub fn list(pin_dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let pid = name.to_str()?.strip_prefix(PREFIX)?.parse().ok()?;
            Some((pid, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Removes the draining directories of agents that are gone (killed while
/// they drained). Returns what was removed.
pub fn remove_stale(pin_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (pid, path) in list(pin_dir) {
        let alive = i32::try_from(pid)
            .ok()
            .is_some_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok());
        if !alive && remove(pin_dir, pid).is_ok() {
            removed.push(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_directories_are_found_by_pid_and_other_names_ignored() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir(tmp.path(), 42)).expect("mkdir");
        std::fs::create_dir(tmp.path().join("draining-x")).expect("mkdir");
        std::fs::write(tmp.path().join("sessions"), b"").expect("file");
        assert_eq!(list(tmp.path()), vec![(42, dir(tmp.path(), 42))]);
        // Moving aside and back keeps the files (plain files stand in
        // for pins here).
        let aside = move_aside(tmp.path(), 7).expect("aside");
        assert!(aside.join("sessions").exists() && !tmp.path().join("sessions").exists());
        move_back(tmp.path(), 7).expect("back");
        assert!(tmp.path().join("sessions").exists() && !aside.exists());
    }

    #[test]
    fn a_dead_agents_directory_is_stale_and_a_live_ones_is_not() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let live = std::process::id();
        std::fs::create_dir(dir(tmp.path(), live)).expect("mkdir");
        // Pid numbers wrap far below this.
        std::fs::create_dir(dir(tmp.path(), 999_999_999)).expect("mkdir");
        assert_eq!(remove_stale(tmp.path()), vec![dir(tmp.path(), 999_999_999)]);
        assert!(dir(tmp.path(), live).exists());
    }
}
