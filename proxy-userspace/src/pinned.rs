//! The agent's pinned maps, read from another process (the operator CLI).
//!
//! Maps are opened with `BPF_OBJ_GET` and `BPF_F_RDONLY`. The kernel then
//! checks only read permission on the pin file, like `open(O_RDONLY)`, so
//! members of `[agent] operator_group` (which the agent gives `r` on the
//! maps and `rx` on the directory) can list sessions without root. Kernels
//! since 6.5 apply `kernel.unprivileged_bpf_disabled` to creating maps and
//! loading programs only, not to opening pinned maps; older ones refuse
//! every bpf() call from users without `CAP_BPF` (EPERM), which the errors
//! here explain.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use nix::unistd::AccessFlags;
use proxy_common::grant::GrantRecord;
use proxy_common::routed::{FlowKey, FlowValue};
use proxy_common::session::{SessionRecord, SocketEntry};
use proxy_common::stats::GlobalStats;

/// `BPF_OBJ_GET` from `enum bpf_cmd`.
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_F_RDONLY`: the fd may read the map, not change it.
const BPF_F_RDONLY: u32 = 1 << 3;
/// `BPF_EXIST`: update an element only if it exists.
const BPF_EXIST: u64 = 2;

/// The `BPF_OBJ_GET` part of `union bpf_attr`; the kernel zero-fills the
/// rest of the union.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error(
        "{dir} does not exist: is the tcpgate agent running with the eBPF data path, and is this its agent.pin_dir? (give --pin-dir)"
    )]
    NoPinDir { dir: PathBuf },
    #[error(
        "{path} does not exist: the agent in this pin directory pins no such map (an older agent, or one still starting)"
    )]
    NoMap { path: PathBuf },
    #[error("permission denied: {0}")]
    Access(String),
    #[error("the kernel refused bpf(BPF_OBJ_GET) on {path} with EPERM: {explanation}")]
    BpfDenied { path: PathBuf, explanation: String },
    #[error("cannot open pinned map {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned map {path} does not have the layout this tcpgate expects (agent and CLI versions differ?)"
    )]
    Layout {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot read pinned map {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The routed path's `FLOWS` pin in the agent's pin directory.
pub const FLOWS_PIN: &str = "flows";

/// How a pinned map is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    ReadOnly,
    ReadWrite,
}

/// The pin directory of one agent.
#[derive(Debug, Clone)]
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    /// Checks that `dir` exists and can be entered.
    pub fn open(dir: &Path) -> Result<Self, PinnedError> {
        match std::fs::metadata(dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PinnedError::NoPinDir {
                    dir: dir.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(PinnedError::Access(explain_access(&dir.join("sessions"))));
            }
            Err(source) => {
                return Err(PinnedError::Open {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn map(&self, file: &str, mode: Mode) -> Result<(PathBuf, Map), PinnedError> {
        let path = self.dir.join(file);
        let fd = obj_get(&path, mode).map_err(|e| classify(&path, e))?;
        let data = MapData::from_fd(fd).map_err(|source| PinnedError::Layout {
            path: path.clone(),
            source,
        })?;
        let map = Map::from_map_data(data).map_err(|source| PinnedError::Layout {
            path: path.clone(),
            source,
        })?;
        Ok((path, map))
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &self,
        file: &str,
        mode: Mode,
    ) -> Result<(PathBuf, HashMap<MapData, K, V>), PinnedError> {
        let (path, map) = self.map(file, mode)?;
        let typed = HashMap::try_from(map).map_err(|source| PinnedError::Layout {
            path: path.clone(),
            source,
        })?;
        Ok((path, typed))
    }

    fn entries<K: aya::Pod, V: aya::Pod>(&self, file: &str) -> Result<Vec<(K, V)>, PinnedError> {
        let (path, map) = self.hash_map::<K, V>(file, Mode::ReadOnly)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            match entry {
                Ok(entry) => out.push(entry),
                // Removed between listing its key and reading it: gone.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(PinnedError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Every session record.
    pub fn sessions(&self) -> Result<Vec<SessionRecord>, PinnedError> {
        Ok(self
            .entries::<u64, SessionRecord>("sessions")?
            .into_iter()
            .map(|(_, record)| record)
            .collect())
    }

    /// Every grant record (not the revocations-pending marker).
    pub fn grants(&self) -> Result<Vec<GrantRecord>, PinnedError> {
        Ok(self
            .entries::<u64, GrantRecord>("grants")?
            .into_iter()
            .filter(|(id, _)| *id != proxy_common::grant::REVOCATIONS_PENDING_KEY)
            .map(|(_, record)| record)
            .collect())
    }

    /// Every spliced socket: (cookie, entry).
    pub fn sockets(&self) -> Result<Vec<(u64, SocketEntry)>, PinnedError> {
        self.entries::<u64, SocketEntry>("sockets")
    }

    /// Every routed flow (`[intercept.routed_grants]`), ended ones included.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, PinnedError> {
        self.entries::<FlowKey, FlowValue>(FLOWS_PIN)
    }

    /// The eBPF programs' counters, summed over the CPUs.
    pub fn stats(&self) -> Result<GlobalStats, PinnedError> {
        let (path, map) = self.map("stats", Mode::ReadOnly)?;
        let array: PerCpuArray<MapData, GlobalStats> =
            PerCpuArray::try_from(map).map_err(|source| PinnedError::Layout {
                path: path.clone(),
                source,
            })?;
        let slots = array
            .get(&0, 0)
            .map_err(|source| PinnedError::Read { path, source })?;
        Ok(crate::metrics::sum_cpus(slots.iter()))
    }

    /// Leaves the marker that tells the agent to look for revocation flags
    /// (root only).
    pub fn mark_revocations_pending(&self) -> Result<(), PinnedError> {
        let (path, mut map) = self.hash_map::<u64, GrantRecord>("grants", Mode::ReadWrite)?;
        let mut marker = grant_marker();
        marker.flags = proxy_common::grant::GRANT_FLAG_REVOKED;
        map.insert(proxy_common::grant::REVOCATIONS_PENDING_KEY, marker, 0)
            .map_err(|source| PinnedError::Read { path, source })
    }

    /// Sets `flags` on a grant's record (root only: opens the map for
    /// writing). Returns false when the grant has no record.
    pub fn flag_grant(&self, grant_id: u64, flags: u32) -> Result<bool, PinnedError> {
        let (path, mut map) = self.hash_map::<u64, GrantRecord>("grants", Mode::ReadWrite)?;
        let mut record = match map.get(&grant_id, 0) {
            Ok(record) => record,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(false),
            Err(source) => return Err(PinnedError::Read { path, source }),
        };
        record.flags |= flags;
        match map.insert(grant_id, record, BPF_EXIST) {
            Ok(()) => Ok(true),
            // The agent removed it meanwhile (expired, or revoked).
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(source) => Err(PinnedError::Read { path, source }),
        }
    }
}

/// The marker record: every field zero but the flags.
fn grant_marker() -> GrantRecord {
    GrantRecord {
        grant_id: proxy_common::grant::REVOCATIONS_PENDING_KEY,
        created_unix_ns: 0,
        expires_unix_ns: 0,
        source_addr: [0; 16],
        kind: 0,
        flags: 0,
        subject: [0; proxy_common::session::SUBJECT_LEN],
        rule: [0; proxy_common::grant::RULE_NAME_LEN],
    }
}

fn obj_get(path: &Path, mode: Mode) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: if mode == Mode::ReadOnly {
            BPF_F_RDONLY
        } else {
            0
        },
    };
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr` for
    // BPF_OBJ_GET and `c_path` outlives the call; the kernel reads exactly
    // `size_of::<ObjGetAttr>()` bytes of it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf() returned a bad fd"))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn classify(path: &Path, error: io::Error) -> PinnedError {
    match error.raw_os_error() {
        Some(libc::ENOENT) => PinnedError::NoMap {
            path: path.to_owned(),
        },
        Some(libc::EACCES) => PinnedError::Access(explain_access(path)),
        Some(libc::EPERM) => PinnedError::BpfDenied {
            path: path.to_owned(),
            explanation: explain_eperm(),
        },
        _ => PinnedError::Open {
            path: path.to_owned(),
            source: error,
        },
    }
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

fn describe(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(meta) => format!(
            "{} (mode {:04o}, owner {}:{})",
            path.display(),
            meta.mode() & 0o7777,
            meta.uid(),
            group_name(meta.gid())
        ),
        Err(_) => path.display().to_string(),
    }
}

/// Says which step of reaching `map` is refused, and what fixes it.
#[must_use]
pub fn explain_access(map: &Path) -> String {
    let pin_dir = map.parent().unwrap_or(map);
    let mut ancestors: Vec<&Path> = pin_dir.ancestors().collect();
    ancestors.reverse();
    for dir in ancestors {
        if nix::unistd::access(dir, AccessFlags::X_OK).is_err() {
            let gid = std::fs::metadata(dir).map(|m| m.gid()).unwrap_or(0);
            if dir == pin_dir && gid != 0 {
                let group = group_name(gid);
                return format!(
                    "cannot enter {}: join the operator group {group} (`usermod -aG {group} $USER`, then log in again)",
                    describe(dir)
                );
            }
            if dir == pin_dir {
                return format!(
                    "cannot enter {}: the agent has no [agent] operator_group, so only root can read its maps; \
                     set operator_group and restart the agent, or run as root",
                    describe(dir)
                );
            }
            return format!(
                "cannot enter {}, above the pin directory {}: an administrator must allow traversal \
                 (`chmod o+x {}`; bpffs mounted by systemd is mode 0700)",
                describe(dir),
                pin_dir.display(),
                dir.display()
            );
        }
    }
    let gid = std::fs::metadata(map).map(|m| m.gid()).unwrap_or(0);
    if gid == 0 {
        format!(
            "{} is readable by root only: set [agent] operator_group and restart the agent, or run as root",
            describe(map)
        )
    } else {
        let group = group_name(gid);
        format!(
            "cannot read {}: join the operator group {group} (`usermod -aG {group} $USER`, then log in again)",
            describe(map)
        )
    }
}

fn explain_eperm() -> String {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    format!(
        "this kernel lets no user without CAP_BPF call bpf() (kernel.unprivileged_bpf_disabled = {sysctl}; \
         kernels before 6.5 apply it to opening pinned maps too). Run as root, grant the CLI CAP_BPF \
         (`setcap cap_bpf+ep $(command -v tcpgate)`), or ask the agent's operator endpoint instead: \
         `curl http://127.0.0.1:9470/v1/sessions`"
    )
}
