//! Support for the install tests: staging with `cargo xtask install`, a
//! reader for systemd unit files and the checks on them ([`unit`]), and a
//! temporary system user.

pub mod session;
pub mod systemd;
pub mod tree;
pub mod unit;
pub mod unprivileged;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use tempfile::TempDir;
pub use unit::Unit;

/// Env var naming the xtask binary; default `<workspace>/target/debug/xtask`.
pub const XTASK_ENV: &str = "TCPGATE_XTASK_BIN";
pub const PREFIX: &str = "/usr/local";

/// The xtask binary (`cargo build` builds it with the workspace).
pub fn xtask_binary() -> Result<PathBuf> {
    let path = std::env::var_os(XTASK_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(
            || crate::agent::workspace_root().join("target/debug/xtask"),
            PathBuf::from,
        );
    ensure!(
        path.is_file(),
        "xtask binary not found at {}; run `cargo build` first, or set {XTASK_ENV}",
        path.display()
    );
    Ok(path)
}

/// Runs `xtask <args>`; returns stdout, failing with its output otherwise.
pub fn xtask<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<String> {
    let output = Command::new(xtask_binary()?)
        .args(args)
        .output()
        .context("run xtask")?;
    let args: Vec<_> = args.iter().map(AsRef::as_ref).collect();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "xtask {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// A `cargo xtask install --destdir` staging of the agent binary under test.
pub struct Staged {
    pub dir: TempDir,
    /// What the install printed.
    pub output: String,
}

impl Staged {
    /// Stages into a fresh directory, traversable by every user (as `/` is),
    /// so a non-root agent can run the staged binary.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tg-stage-").tempdir()?;
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let output = install(dir.path(), &[])?;
        Ok(Self { dir, output })
    }

    /// `path` as installed on the system, inside the staging directory.
    pub fn path(&self, path: &str) -> PathBuf {
        self.dir.path().join(path.trim_start_matches('/'))
    }

    pub fn binary(&self) -> PathBuf {
        self.path(&format!("{PREFIX}/bin/tcpgate"))
    }

    pub fn unit(&self) -> Result<Unit> {
        let path = self.path(&format!("{PREFIX}/lib/systemd/system/tcpgate.service"));
        Unit::parse(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)
    }
}

/// `xtask install --destdir DIR --binary <agent under test> <extra>`.
pub fn install(destdir: &Path, extra: &[&str]) -> Result<String> {
    let binary = crate::agent::agent_binary()?;
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "install".as_ref(),
        "--destdir".as_ref(),
        destdir.as_os_str(),
        "--binary".as_ref(),
        binary.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    xtask(&args)
}

/// A system user and its group, plus an extra group it belongs to, created
/// for one test with unique names and deleted on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub extra_group: String,
    pub extra_gid: u32,
}

/// useradd and userdel lock /etc/passwd and give up after a while: one at
/// a time within this process.
static ACCOUNTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held by tests that use or watch the host's accounts named like a real
/// install's (`tcpgate-operators`): they share those names, so they run one
/// at a time.
static REAL_NAMES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Serializes the tests that share the real accounts' names.
pub fn real_names_lock() -> std::sync::MutexGuard<'static, ()> {
    REAL_NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The host group `tcpgate-operators`, as an install would have it, for a
/// check that resolves it; created if missing and then removed on drop.
/// Holds [`real_names_lock`] while it lives.
pub struct HostOperatorsGroup {
    created: bool,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl HostOperatorsGroup {
    pub const NAME: &'static str = "tcpgate-operators";

    pub fn ensure() -> Result<Self> {
        let serial = real_names_lock();
        let created = getent_gid(Self::NAME).is_err();
        if created {
            let _accounts = ACCOUNTS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            run(Command::new("groupadd").args(["--system", Self::NAME]))?;
        }
        Ok(Self {
            created,
            _serial: serial,
        })
    }
}

impl Drop for HostOperatorsGroup {
    fn drop(&mut self) {
        if self.created {
            let _accounts = ACCOUNTS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = run(Command::new("groupdel").arg(Self::NAME));
        }
    }
}

impl TestUser {
    pub fn create() -> Result<Self> {
        let _serial = ACCOUNTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = crate::unique_name("tgu");
        let extra_group = crate::unique_name("tgo");
        run(Command::new("groupadd").args(["--system", &extra_group]))?;
        let user = run(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/",
            "--shell",
            "/usr/sbin/nologin",
            "--groups",
            &extra_group,
            &name,
        ]));
        if let Err(e) = user {
            let _ = run(Command::new("groupdel").arg(&extra_group));
            return Err(e);
        }
        let mut made = Self {
            name,
            uid: 0,
            gid: 0,
            extra_group,
            extra_gid: 0,
        };
        made.uid = id(&["-u", &made.name])?;
        made.gid = id(&["-g", &made.name])?;
        made.extra_gid = getent_gid(&made.extra_group)?;
        Ok(made)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _serial = ACCOUNTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // userdel also removes the user's own group (USERGROUPS_ENAB).
        let _ = run(Command::new("userdel").arg(&self.name));
        let _ = run(Command::new("groupdel").arg(&self.extra_group));
        if getent_gid(&self.name).is_ok() {
            let _ = run(Command::new("groupdel").arg(&self.name));
        }
    }
}

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("run {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn id(args: &[&str]) -> Result<u32> {
    let text = run(Command::new("id").args(args))?;
    text.trim()
        .parse()
        .with_context(|| format!("id {args:?}: {text}"))
}

fn getent_gid(group: &str) -> Result<u32> {
    let line = run(Command::new("getent").args(["group", group]))?;
    line.split(':')
        .nth(2)
        .and_then(|gid| gid.trim().parse().ok())
        .with_context(|| format!("getent group {group}: {line}"))
}
