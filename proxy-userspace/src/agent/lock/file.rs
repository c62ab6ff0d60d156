//! Lock files no other local user can take: `flock`s on files in the
//! agent's runtime directory, which only root or the agent's account may
//! write, each file readable by its owner alone (a `flock` needs only an
//! open file, so a file anyone can open is a lock anyone can hold).

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::LockError;

/// Where the locks live without `$RUNTIME_DIRECTORY`: the unit's
/// `RuntimeDirectory=tcpgate` (and packaging/tmpfiles.d).
const DEFAULT_RUNTIME_DIR: &str = "/run/tcpgate";

/// The account packaging/sysusers.d creates for the agent. A root agent
/// trusts directories it owns too: the service's runtime and pin
/// directories are the same ones a root agent on that host must lock.
const SERVICE_ACCOUNT: &str = "tcpgate";

/// `$RUNTIME_DIRECTORY` as systemd sets it (the first, when a unit names
/// several), else [`DEFAULT_RUNTIME_DIR`].
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|dirs| {
            let first = dirs.to_string_lossy().split(':').next()?.to_owned();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR))
}

/// Root, this process's user, and (for root) the service account.
pub fn trusted_owner(uid: u32) -> bool {
    let me = nix::unistd::geteuid();
    if uid == 0 || uid == me.as_raw() {
        return true;
    }
    me.is_root()
        && nix::unistd::User::from_name(SERVICE_ACCOUNT)
            .ok()
            .flatten()
            .is_some_and(|user| user.uid.as_raw() == uid)
}

/// Creates `dir` (with `mode`) when missing, then checks that no other
/// local user can add, remove or replace what is in it.
pub fn trusted_dir(dir: &Path, mode: u32) -> Result<Metadata, LockError> {
    let io = |source| LockError::Dir {
        path: dir.to_owned(),
        source,
    };
    if !dir.exists() {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), mode)
            .create(dir)
            .map_err(io)?;
    }
    let meta = std::fs::metadata(dir).map_err(io)?;
    let untrusted = |why: String| LockError::Untrusted {
        path: dir.to_owned(),
        why,
    };
    if !meta.is_dir() {
        return Err(untrusted("not a directory".to_owned()));
    }
    if !trusted_owner(meta.uid()) {
        return Err(untrusted(format!(
            "owned by uid {}, not root, this agent's user or {SERVICE_ACCOUNT}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(meta)
}

/// A lock file's outcome: held, or held by someone else (pid when known).
pub enum Locked {
    Held(LockFile),
    Busy { pid: Option<i32> },
}

/// A held lock file. Dropping it removes the file, then lets go of it: a
/// process that opened the file before cannot then hold a lock on it that
/// counts (see [`lock`]), and no file is left behind.
pub struct LockFile {
    path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens (creating it, mode 0600) and locks `name` in the trusted `dir`.
pub fn lock(dir: &Path, dir_meta: &Metadata, name: &str) -> Result<Locked, LockError> {
    let path = dir.join(name);
    loop {
        let file = open(&path, dir_meta)?;
        let meta = file.metadata().map_err(|e| lock_error(&path, e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            // Locked, but maybe a file its holder removed since this
            // process opened it: only the file at the path counts.
            Ok(held) if same_file(&path, &meta) => {
                return Ok(Locked::Held(LockFile { path, _lock: held }));
            }
            Ok(_) => {}
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Ok(Locked::Busy {
                    pid: holder(meta.dev(), meta.ino()),
                });
            }
            Err((_, errno)) => return Err(lock_error(&path, errno.into())),
        }
    }
}

/// Removes the lock files in `dir` that no process holds: those of agents
/// that were killed.
pub fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            (n.starts_with("netns-") || n.starts_with("pins-")) && n.ends_with(".lock")
        });
        let Some(file) = ours.then(|| open_existing(&path)).flatten() else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if let Ok(held) = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            && same_file(&path, &meta)
        {
            drop(LockFile { path, _lock: held });
        }
    }
}

fn lock_error(path: &Path, source: std::io::Error) -> LockError {
    LockError::LockFile {
        path: path.to_owned(),
        source,
    }
}

fn open_existing(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()
}

/// Whether `path` still names the file `meta` describes.
fn same_file(path: &Path, meta: &Metadata) -> bool {
    std::fs::symlink_metadata(path)
        .is_ok_and(|now| now.dev() == meta.dev() && now.ino() == meta.ino())
}

/// Opens or creates the lock file, readable by its owner alone.
fn open(path: &Path, dir_meta: &Metadata) -> Result<File, LockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| lock_error(path, e))?;
    let meta = file.metadata().map_err(|e| lock_error(path, e))?;
    // A root agent in the service's directory hands the file to the
    // service account, or the service could not open it after a root run.
    if meta.uid() == 0 && dir_meta.uid() != 0 && nix::unistd::geteuid().is_root() {
        std::os::unix::fs::fchown(&file, Some(dir_meta.uid()), Some(dir_meta.gid()))
            .map_err(|e| lock_error(path, e))?;
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| lock_error(path, e))?;
    }
    Ok(file)
}

/// The pid holding a `flock` on the file (`dev`, `ino`), from /proc/locks.
/// None where /proc hides it (the unit's `ProcSubset=pid`).
fn holder(dev: u64, ino: u64) -> Option<i32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let id = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    holder_in(&locks, &id)
}

/// `1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF`; waiters (`1: -> ...`)
/// are skipped.
fn holder_in(locks: &str, id: &str) -> Option<i32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, file, ..] if *file == id => pid.parse().ok(),
            _ => None,
        }
    })
}

/// A short, stable file name for `key` (a pin directory's path): FNV-1a,
/// the same in every build, so an agent and its successor agree.
pub fn stable_name(prefix: &str, key: &[u8]) -> String {
    let hash = key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{prefix}-{hash:016x}.lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_found_by_device_and_inode() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4321 00:19:77 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 99 00:19:1234 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:19:1234 0 EOF\n\
                     3: POSIX  ADVISORY  WRITE 55 00:19:1234 0 EOF\n";
        assert_eq!(holder_in(locks, "00:19:1234"), Some(1234));
        assert_eq!(holder_in(locks, "00:19:77"), Some(4321));
        assert_eq!(holder_in(locks, "00:1a:1234"), None);
    }

    #[test]
    fn stable_names_differ_by_key_and_do_not_change() {
        assert_eq!(
            stable_name("pins", b"/sys/fs/bpf/tcpgate"),
            stable_name("pins", b"/sys/fs/bpf/tcpgate")
        );
        assert_ne!(
            stable_name("pins", b"/sys/fs/bpf/a"),
            stable_name("pins", b"/sys/fs/bpf/b")
        );
        // FNV-1a 64 of the empty key is its offset basis.
        assert_eq!(stable_name("pins", b""), "pins-cbf29ce484222325.lock");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let err = trusted_dir(dir.path(), 0o755).expect_err("world-writable");
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        trusted_dir(dir.path(), 0o755).expect("0755, owned by this user");
    }

    #[test]
    fn a_second_lock_on_the_same_file_is_busy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = trusted_dir(dir.path(), 0o755).expect("trusted");
        let Locked::Held(_held) = lock(dir.path(), &meta, "x.lock").expect("lock") else {
            panic!("the first lock is taken");
        };
        let Locked::Busy { pid } = lock(dir.path(), &meta, "x.lock").expect("lock") else {
            panic!("a second lock on the file is refused");
        };
        // /proc/locks names the process holding it: this one.
        assert_eq!(pid, i32::try_from(std::process::id()).ok());
        let mode = std::fs::metadata(dir.path().join("x.lock"))
            .expect("stat")
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only its owner can open it");
        drop(_held);
        assert!(!dir.path().join("x.lock").exists(), "removed when let go");
    }

    #[test]
    fn a_sweep_removes_only_the_lock_files_nobody_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = trusted_dir(dir.path(), 0o755).expect("trusted");
        let Locked::Held(held) = lock(dir.path(), &meta, "netns-1.lock").expect("lock") else {
            panic!("the lock is taken");
        };
        for name in ["netns-2.lock", "pins-3.lock", "other.lock"] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        sweep(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["netns-1.lock", "other.lock"]);
        drop(held);
    }
}
