//! The host's bpffs at /sys/fs/bpf and per-test pin directories in it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::statfs;

pub const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of every pin directory made here, for leak checks.
pub const PIN_DIR_PREFIX: &str = "tg-test-";
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

static MOUNT_LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot stat {BPFFS}")]
    Stat(#[source] nix::Error),
    #[error("cannot mount bpffs at {BPFFS}")]
    Mount(#[source] nix::Error),
}

/// Whether /sys/fs/bpf is a bpffs mount (in this mount namespace).
pub fn is_mounted() -> Result<bool, BpffsError> {
    let stat = statfs(BPFFS).map_err(BpffsError::Stat)?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let magic = i64::from(stat.filesystem_type().0 as i64);
    Ok(magic == BPF_FS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf if it is not mounted yet, as the agent does
/// on a fresh bastion. The mount is the host's and is left in place.
pub fn ensure_mounted() -> Result<(), BpffsError> {
    let _serialized = MOUNT_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if is_mounted()? {
        return Ok(());
    }
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(BpffsError::Mount)
}

/// A unique path `/sys/fs/bpf/tg-test-<pid>-<n>` that does not exist yet;
/// whatever is there on drop is removed (`rm -rf`).
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> PinDir {
        let name = format!(
            "{PIN_DIR_PREFIX}{}-{}",
            std::process::id(),
            crate::next_id()
        );
        PinDir {
            path: Path::new(BPFFS).join(name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PinDir {
    fn default() -> Self {
        PinDir::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => eprintln!(
                "tcpgate-tests: removing pin dir {}: {err}",
                self.path.display()
            ),
        }
    }
}
