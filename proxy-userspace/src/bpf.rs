//! Loading the embedded eBPF object and pinning its maps: the only place
//! that talks to aya's loader. Everything else receives typed map handles.

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData};
use aya::{Ebpf, EbpfLoader};
use proxy_common::map_names;

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
    #[error("bpffs is not mounted at {0} (mount it with `mount -t bpf bpf {0}`)")]
    NoBpffs(PathBuf),
    #[error("cannot create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot load the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel with sockmap support)"
    )]
    Load(#[source] aya::EbpfError),
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
    #[error("cannot pin map {name} at {path}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

/// Sizes of the maps, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    pub max_sessions: u32,
}

/// The loaded object. Dropping it detaches every program it attached.
pub struct LoadedBpf {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
}

/// Whether `dir` or its nearest existing ancestor lives on a bpffs mount.
fn on_bpffs(dir: &Path) -> bool {
    let mut probe = dir;
    loop {
        if probe.exists() {
            return nix::sys::statfs::statfs(probe)
                .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
                .unwrap_or(false);
        }
        match probe.parent() {
            Some(parent) => probe = parent,
            None => return false,
        }
    }
}

impl LoadedBpf {
    /// Loads the embedded object with maps sized for `sizes`.
    pub fn load(sizes: MapSizes, pin_dir: &Path) -> Result<Self, BpfError> {
        if !on_bpffs(pin_dir) {
            let mount = pin_dir
                .ancestors()
                .find(|p| p.ends_with("bpf"))
                .unwrap_or(pin_dir);
            return Err(BpfError::NoBpffs(mount.to_owned()));
        }
        let sessions = sizes.max_sessions;
        let sockets = sessions.saturating_mul(2);
        let ebpf = EbpfLoader::new()
            .map_max_entries(map_names::SESSIONS, sessions)
            .map_max_entries(map_names::GRANTS, sessions)
            .map_max_entries(map_names::SOCKETS, sockets)
            .map_max_entries(map_names::SOCKHASH, sockets)
            .load(crate::EBPF_OBJECT)
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

    /// Takes a map out of the object, for a typed handle.
    pub fn take_map(&mut self, name: &'static str) -> Result<Map, BpfError> {
        self.ebpf.take_map(name).ok_or(BpfError::MissingMap(name))
    }
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
    for (_, file) in PINNED {
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
    if let Err(e) = std::fs::remove_dir(pin_dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(dir = %pin_dir.display(), error = %e, "pin directory not removed");
        }
    }
    Ok(removed)
}
