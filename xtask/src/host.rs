//! Facts about the machine and the environment xtask runs in, gathered once.

use std::env;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

pub struct Host {
    /// `$CARGO_HOME`, or `~/.cargo`: where `cargo install` puts binaries.
    pub cargo_home: PathBuf,
    /// The rustup toolchain in use. rustup sets RUSTUP_TOOLCHAIN for the
    /// processes it starts, so under `cargo xtask` it names the toolchain
    /// that built xtask itself.
    pub toolchain: String,
    /// PATH for child processes: `$CARGO_HOME/bin` first, because aya-build
    /// finds bpf-linker through PATH and it may not be there yet.
    pub child_path: OsString,
    /// The workspace root; every cargo command runs from here.
    pub workspace: PathBuf,
    pub is_root: bool,
}

impl Host {
    pub fn detect() -> Result<Self> {
        let cargo_home = cargo_home()?;
        let current_path = env::var_os("PATH").unwrap_or_default();
        let child_path = prepend_path(&cargo_home.join("bin"), &current_path)?;
        Ok(Self {
            toolchain: env::var("RUSTUP_TOOLCHAIN")
                .ok()
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "stable".to_owned()),
            child_path,
            cargo_home,
            workspace: workspace_root(),
            is_root: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|status| effective_uid(&status))
                == Some(0),
        })
    }

    /// A `cargo` command for the toolchain in use, run from the workspace
    /// root with our PATH.
    pub fn cargo(&self) -> Command {
        // `cargo run` tells us which cargo binary started us.
        let program = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.workspace)
            .env("PATH", &self.child_path);
        cmd
    }

    /// The first executable called `name` in the child PATH.
    pub fn find_program(&self, name: &str) -> Option<PathBuf> {
        find_in_path(name, &self.child_path)
    }
}

/// The effective uid in /proc/PID/status (`Uid:` real, effective, saved,
/// filesystem): std has no geteuid, and this keeps xtask free of libc.
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cargo_home() -> Result<PathBuf> {
    let dir = match env::var_os("CARGO_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = env::var_os("HOME")
                .filter(|dir| !dir.is_empty())
                .context("neither CARGO_HOME nor HOME is set")?;
            PathBuf::from(home).join(".cargo")
        }
    };
    if dir.is_absolute() {
        Ok(dir)
    } else {
        Ok(env::current_dir()
            .context("cannot read the current directory")?
            .join(dir))
    }
}

fn workspace_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR at run time too; prefer it so a
    // moved checkout still points at itself.
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(manifest_dir)
}

/// `dir` followed by `path`, unless `dir` already comes first.
pub fn prepend_path(dir: &Path, path: &OsStr) -> Result<OsString> {
    let mut dirs: Vec<PathBuf> = env::split_paths(path).collect();
    if dirs.first().map(PathBuf::as_path) != Some(dir) {
        dirs.insert(0, dir.to_path_buf());
    }
    env::join_paths(dirs).with_context(|| format!("{} cannot go into PATH", dir.display()))
}

pub fn find_in_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        let status = "Name:\tcargo\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").expect("procfs");
        assert!(effective_uid(&own).is_some(), "{own}");
    }

    #[test]
    fn prepend_path_adds_the_dir_once() {
        let dir = Path::new("/home/u/.cargo/bin");
        let once = prepend_path(dir, OsStr::new("/usr/bin:/bin")).expect("valid");
        assert_eq!(once, "/home/u/.cargo/bin:/usr/bin:/bin");
        let twice = prepend_path(dir, &once).expect("valid");
        assert_eq!(twice, once);
    }

    #[test]
    fn find_in_path_skips_files_that_are_not_executable() {
        let base = env::temp_dir().join(format!("xtask-find-{}", std::process::id()));
        let (plain, exec) = (base.join("plain"), base.join("exec"));
        std::fs::create_dir_all(&plain).expect("mkdir");
        std::fs::create_dir_all(&exec).expect("mkdir");
        std::fs::write(plain.join("tool"), "").expect("write");
        std::fs::write(exec.join("tool"), "").expect("write");
        std::fs::set_permissions(exec.join("tool"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = env::join_paths([&plain, &exec]).expect("join");
        let found = find_in_path("tool", &path);
        let missing = find_in_path("other", &path);
        std::fs::remove_dir_all(&base).expect("cleanup");
        assert_eq!(found, Some(exec.join("tool")));
        assert_eq!(missing, None);
    }
}
