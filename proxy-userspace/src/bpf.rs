//! Loading the embedded eBPF object and pinning its maps: the only place
//! that talks to aya's loader. Everything else receives typed map handles.

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData};
use aya::{Ebpf, EbpfLoader};
use proxy_common::map_names;

pub mod run_stats;
mod sizes;

pub use sizes::MapSizes;
use sizes::flow_events_bytes;

/// Maps pinned under the pin directory, with the file name operators see.
pub const PINNED: [(&str, &str); 5] = [
    (map_names::SESSIONS, "sessions"),
    (map_names::SOCKETS, "sockets"),
    (map_names::GRANTS, "grants"),
    (map_names::INTERCEPT, "intercept"),
    (map_names::STATS, "stats"),
];

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(transparent)]
    NotBpffs(#[from] NotBpffs),
    #[error("cannot create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot load the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON, and a kernel with sockmap support)"
    )]
    Load(#[source] aya::EbpfError),
    /// The binary embeds no object: it was built with `AYA_BUILD_SKIP`
    /// (unit tests without bpf-linker).
    #[error("built with AYA_BUILD_SKIP: no eBPF object; rebuild without it")]
    NoObject,
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {name} has an unexpected type")]
    MapType {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("cannot load program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot give group {gid} read access to {path} (agent.operator_group)")]
    OperatorAccess {
        path: PathBuf,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot pin map {name} at {path}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

/// The loaded object. Dropping it detaches every program it attached.
pub struct LoadedBpf {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
}

/// The pin directory is not on a bpf filesystem, so nothing can be pinned
/// there (and creating it fails with a bare ENOENT or EPERM).
#[derive(Debug, thiserror::Error)]
#[error("agent.pin_dir {dir} is not on a bpf filesystem: {existing} is on {fs}. {advice}")]
pub struct NotBpffs {
    pub dir: PathBuf,
    /// The pin directory's nearest existing ancestor, or itself.
    pub existing: PathBuf,
    pub fs: String,
    pub advice: &'static str,
}

/// Checks that `dir`, or its nearest existing ancestor, is on bpffs. When
/// the filesystem cannot even be looked at, the caller's next step reports
/// the real error.
pub fn check_bpffs(dir: &Path) -> Result<(), NotBpffs> {
    use nix::sys::statfs::{BPF_FS_MAGIC, SYSFS_MAGIC, TMPFS_MAGIC, statfs};
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let Ok(stat) = statfs(existing) else {
        return Ok(());
    };
    let fs_type = stat.filesystem_type();
    if fs_type == BPF_FS_MAGIC {
        return Ok(());
    }
    let (fs, advice) = if fs_type == SYSFS_MAGIC {
        // /sys/fs/bpf is a plain sysfs directory until bpffs is mounted on
        // it, and `ip netns exec` remounts /sys without it.
        (
            "sysfs".to_owned(),
            "bpffs is not mounted there: mount it with `mount -t bpf bpf /sys/fs/bpf`. \
             Under `ip netns exec`, which remounts /sys without bpffs, start the agent \
             with `nsenter --net=/run/netns/NAME tcpgate run ...` instead: it keeps the \
             host's mounts.",
        )
    } else {
        let fs = if fs_type == TMPFS_MAGIC {
            "tmpfs".to_owned()
        } else {
            format!("a filesystem of type {:#x}", fs_type.0)
        };
        (
            fs,
            "Set agent.pin_dir under a bpffs mount, e.g. /sys/fs/bpf/tcpgate (mount \
             bpffs with `mount -t bpf bpf /sys/fs/bpf`).",
        )
    };
    Err(NotBpffs {
        dir: dir.to_owned(),
        existing: existing.to_owned(),
        fs,
        advice,
    })
}

impl LoadedBpf {
    /// Finds program `name` in the object as a `P` and loads it into the
    /// kernel with `load` (aya gives each program type its own), for the
    /// caller to attach.
    pub fn load_program<P>(
        &mut self,
        name: &'static str,
        load: fn(&mut P) -> Result<(), aya::programs::ProgramError>,
    ) -> Result<&mut P, BpfError>
    where
        for<'a> &'a mut P:
            TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let program: &mut P = self
            .ebpf
            .program_mut(name)
            .ok_or(BpfError::MissingProgram(name))?
            .try_into()
            .map_err(|source| BpfError::Program { name, source })?;
        load(program).map_err(|source| BpfError::Program { name, source })?;
        Ok(program)
    }

    /// Loads the embedded object with maps sized for `sizes`.
    pub fn load(sizes: MapSizes, pin_dir: &Path) -> Result<Self, BpfError> {
        let object = embedded_object()?;
        check_bpffs(pin_dir)?;
        let sessions = sizes.max_sessions;
        let sockets = sessions.saturating_mul(2);
        let ebpf = EbpfLoader::new()
            .map_max_entries(map_names::SESSIONS, sessions)
            .map_max_entries(map_names::GRANTS, sizes.grants.max(1))
            .map_max_entries(map_names::SOCKETS, sockets)
            .map_max_entries(map_names::SOCKHASH, sockets)
            .map_max_entries(map_names::DIRECTION_MODES, sockets)
            .map_max_entries(map_names::STREAM_SEQ, sockets)
            .map_max_entries(map_names::FLOWS, sizes.flows.max(1))
            .map_max_entries(map_names::FLOW_EVENTS, flow_events_bytes(sizes.flows))
            .override_global("SKB_CB_OFFSET", &sizes.skb_cb_offset, true)
            .load(object)
            .map_err(BpfError::Load)?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Creates the pin directory and pins the operator-facing maps in it.
    /// Call after any stale pins were cleaned up.
    pub fn pin_maps(&mut self) -> Result<(), BpfError> {
        std::fs::create_dir_all(&self.pin_dir).map_err(|source| BpfError::PinDir {
            path: self.pin_dir.clone(),
            source,
        })?;
        for (name, file) in PINNED {
            let path = self.pin_dir.join(file);
            let map = self.ebpf.map(name).ok_or(BpfError::MissingMap(name))?;
            map.pin(&path)
                .map_err(|source| BpfError::Pin { name, path, source })?;
        }
        Ok(())
    }

    /// Pins one more map at `file` in the pin directory, replacing a stale pin.
    pub fn pin_map(&mut self, name: &'static str, file: &str) -> Result<(), BpfError> {
        let path = self.pin_dir.join(file);
        let _ = std::fs::remove_file(&path);
        let map = self.ebpf.map(name).ok_or(BpfError::MissingMap(name))?;
        map.pin(&path)
            .map_err(|source| BpfError::Pin { name, path, source })
    }

    /// Takes a map out of the object, for a typed handle.
    pub fn take_map(&mut self, name: &'static str) -> Result<Map, BpfError> {
        self.ebpf.take_map(name).ok_or(BpfError::MissingMap(name))
    }
}

/// The object build.rs embedded, or [`BpfError::NoObject`] when the build
/// skipped the eBPF crate (it then embeds an empty file).
pub fn embedded_object() -> Result<&'static [u8], BpfError> {
    object_or_skipped(crate::EBPF_OBJECT)
}

fn object_or_skipped(object: &'static [u8]) -> Result<&'static [u8], BpfError> {
    if object.is_empty() {
        Err(BpfError::NoObject)
    } else {
        Ok(object)
    }
}

/// Mode of the pin directory when an operator group may read it.
pub const OPERATOR_DIR_MODE: u32 = 0o750;
/// Mode of each pinned map when an operator group may read it. Read
/// permission is what `BPF_OBJ_GET` with `BPF_F_RDONLY` checks; the write
/// bit stays with root, so operators cannot change a map.
pub const OPERATOR_MAP_MODE: u32 = 0o640;

/// Makes the pin directory `root:<gid>` mode 0750 and every pinned map
/// `root:<gid>` mode 0640, so members of the group can open the maps
/// read-only (`tcpgate sessions`, `tcpgate grants`, `bpftool`).
pub fn grant_operator_access(pin_dir: &Path, gid: nix::unistd::Gid) -> Result<(), BpfError> {
    use std::os::unix::fs::PermissionsExt as _;
    let set = |path: &Path, mode: u32| {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(io::Error::from)
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
            .map_err(|source| BpfError::OperatorAccess {
                path: path.to_owned(),
                gid: gid.as_raw(),
                source,
            })
    };
    set(pin_dir, OPERATOR_DIR_MODE)?;
    for (_, file) in PINNED {
        set(&pin_dir.join(file), OPERATOR_MAP_MODE)?;
    }
    if let Some((dir, mode)) = closed_ancestor(pin_dir, gid) {
        tracing::warn!(
            dir = %dir.display(),
            mode = %format_args!("{mode:04o}"),
            "operators in the group cannot enter this directory above the pin directory; \
             allow traversal (chmod o+x, or chgrp to the operator group and chmod g+x)"
        );
    }
    Ok(())
}

/// The first ancestor of `dir` that neither others nor group `gid` may
/// traverse (e.g. /sys/fs/bpf mounted with mode 0700).
fn closed_ancestor(dir: &Path, gid: nix::unistd::Gid) -> Option<(PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    dir.ancestors().skip(1).find_map(|ancestor| {
        let meta = std::fs::metadata(ancestor).ok()?;
        let mode = meta.mode() & 0o7777;
        let open = mode & 0o001 != 0 || (meta.gid() == gid.as_raw() && mode & 0o010 != 0);
        (!open).then(|| (ancestor.to_owned(), mode))
    })
}

/// Converts a taken map into its typed handle, naming it on failure.
pub fn typed<T>(name: &'static str, map: Map) -> Result<T, BpfError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|source| BpfError::MapType { name, source })
}

/// Opens a pinned map read-only-by-convention (for the operator CLI).
pub fn open_pinned(pin_dir: &Path, file: &str) -> Result<MapData, aya::maps::MapError> {
    MapData::from_pin(pin_dir.join(file))
}

/// Removes the pinned maps under `pin_dir` (keeping the directory, which
/// the running agent holds its lock on). Returns what was removed.
pub fn remove_pin_files(pin_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let routed = [crate::routed::FLOWS_PIN];
    for file in PINNED.iter().map(|(_, file)| *file).chain(routed) {
        let path = pin_dir.join(file);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Removes the pinned maps and the pin directory itself.
pub fn remove_pins(pin_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let removed = remove_pin_files(pin_dir)?;
    if let Err(e) = std::fs::remove_dir(pin_dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %pin_dir.display(), error = %e, "pin directory not removed");
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_object_says_the_build_skipped_ebpf() {
        let err = object_or_skipped(&[]).expect_err("empty object");
        assert_eq!(
            err.to_string(),
            "built with AYA_BUILD_SKIP: no eBPF object; rebuild without it"
        );
        assert_eq!(object_or_skipped(b"\x7fELF").ok(), Some(&b"\x7fELF"[..]));
    }

    #[test]
    fn the_embedded_object_matches_the_build() {
        // A normal build embeds an ELF object; a skipped one, nothing.
        let skipped = option_env!("AYA_BUILD_SKIP")
            .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        match embedded_object() {
            Ok(object) => {
                assert!(!skipped, "AYA_BUILD_SKIP set but an object is embedded");
                assert!(object.starts_with(b"\x7fELF"), "not an ELF object");
            }
            Err(err) => {
                assert!(skipped, "no eBPF object without AYA_BUILD_SKIP: {err}");
                assert!(matches!(err, BpfError::NoObject));
            }
        }
    }

    #[test]
    fn a_pin_dir_on_sysfs_says_bpffs_is_not_mounted_and_how_to_fix_it() {
        // What /sys/fs/bpf is under `ip netns exec`: a plain sysfs directory.
        let dir = Path::new("/sys/kernel/tcpgate-no-such-dir/pins");
        let err = check_bpffs(dir).expect_err("sysfs is not bpffs");
        assert_eq!(err.existing, Path::new("/sys/kernel"));
        assert_eq!(err.fs, "sysfs");
        let text = err.to_string();
        for needed in [
            "agent.pin_dir /sys/kernel/tcpgate-no-such-dir/pins",
            "bpffs is not mounted",
            "mount -t bpf bpf /sys/fs/bpf",
            "ip netns exec",
            "nsenter --net=",
        ] {
            assert!(text.contains(needed), "{needed:?} missing from: {text}");
        }
    }

    #[test]
    fn a_pin_dir_on_another_filesystem_names_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = check_bpffs(&tmp.path().join("a/b")).expect_err("not bpffs");
        assert_eq!(err.existing, tmp.path());
        assert!(
            err.to_string()
                .contains("Set agent.pin_dir under a bpffs mount"),
            "{err}"
        );
    }
}
