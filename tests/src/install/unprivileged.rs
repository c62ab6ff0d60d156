//! Starting the agent the way tcpgate.service does, without systemd: as an
//! unprivileged user with only the given capabilities (ambient, inheritable,
//! permitted, effective and bounding), no-new-privileges and the unit's
//! umask, through util-linux's setpriv.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use tempfile::TempDir;

use super::TestUser;
use crate::auth_fixture::Launch;

/// `CAP_NET_ADMIN` → `net_admin`, as setpriv spells it.
fn setpriv_name(cap: &str) -> String {
    cap.trim_start_matches("CAP_").to_ascii_lowercase()
}

/// `-all,+bpf,+net_admin`: exactly these.
fn setpriv_set(caps: &BTreeSet<String>) -> String {
    std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", setpriv_name(c))))
        .collect::<Vec<_>>()
        .join(",")
}

/// What the agent's process may hold.
pub struct Privileges {
    /// Ambient and inheritable (and so permitted and effective) capabilities.
    pub ambient: BTreeSet<String>,
    pub bounding: BTreeSet<String>,
    pub no_new_privs: bool,
}

impl Privileges {
    /// What tcpgate.service gives: `caps` as ambient and bounding set
    /// (AmbientCapabilities=, CapabilityBoundingSet=), NoNewPrivileges=yes.
    pub fn unit(caps: &BTreeSet<String>) -> Self {
        Self {
            ambient: caps.clone(),
            bounding: caps.clone(),
            no_new_privs: true,
        }
    }
}

/// A wrapper script that execs `binary` as `user` with exactly the given
/// privileges. It is the agent's process (exec all the way), so the
/// fixture's pid is the agent's.
pub struct Wrapper {
    _dir: TempDir,
    _runtime: RuntimeDir,
    pub path: PathBuf,
}

/// The unit's `RuntimeDirectory=`: a directory the agent's user owns,
/// named to the agent in `$RUNTIME_DIRECTORY` (its locks live there).
/// Removed with the wrapper.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn new(user: &TestUser) -> Result<Self> {
        let path = PathBuf::from(format!("/run/tcpgate-test-{}", user.uid));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let dir = Self(path);
        std::os::unix::fs::chown(&dir.0, Some(user.uid), Some(user.gid))?;
        std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(dir)
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Wrapper {
    pub fn new(binary: &Path, user: &TestUser, privileges: &Privileges) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tg-setpriv-").tempdir()?;
        let path = dir.path().join("tcpgate-as-service");
        let runtime = RuntimeDir::new(user)?;
        let ambient = setpriv_set(&privileges.ambient);
        let bounding = setpriv_set(&privileges.bounding);
        let no_new_privs = if privileges.no_new_privs {
            "--no-new-privs "
        } else {
            ""
        };
        let script = format!(
            "#!/bin/sh\nset -eu\n\
             # systemd's notify socket accepts every service; the test's lives in a\n\
             # private directory, so open it to the agent's user.\n\
             chmod 0711 \"$(dirname \"$NOTIFY_SOCKET\")\"\n\
             chown {uid} \"$NOTIFY_SOCKET\"\n\
             umask 0027\n\
             export RUNTIME_DIRECTORY={runtime}\n\
             exec setpriv --reuid={uid} --regid={gid} --groups={extra} {no_new_privs}\\\n\
             \x20 --inh-caps={ambient} --ambient-caps={ambient} --bounding-set={bounding} \\\n\
             \x20 -- {binary} \"$@\"\n",
            uid = user.uid,
            gid = user.gid,
            extra = user.extra_gid,
            binary = binary.display(),
            runtime = runtime.0.display(),
        );
        crate::write_executable(&path, script.as_bytes(), 0o755)?;
        Ok(Self {
            _dir: dir,
            _runtime: runtime,
            path,
        })
    }

    /// Starts the fixture's agent through this wrapper. Like the unit, the
    /// agent gets its pin directory made for it (ExecStartPre=+install -d)
    /// and owns its own files (config dir, audit log).
    pub fn launch(&self, user: &TestUser) -> Launch {
        let (uid, gid, extra_gid) = (user.uid, user.gid, user.extra_gid);
        Launch {
            binary: Some(self.path.clone()),
            prepare: Some(Box::new(move |builder| {
                let dir = builder.dir();
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .with_context(|| format!("chown {}", dir.display()))?;
                for entry in std::fs::read_dir(dir)? {
                    std::os::unix::fs::chown(entry?.path(), Some(uid), Some(gid))?;
                }
                let pins = builder.pin_dir();
                let status = Command::new("install")
                    .args(["-d", "-m", "0750"])
                    .arg(format!("--owner={uid}"))
                    .arg(format!("--group={extra_gid}"))
                    .arg(pins)
                    .status()?;
                ensure!(status.success(), "install -d {}", pins.display());
                Ok(())
            })),
            ..Launch::default()
        }
    }
}

/// One `Cap*:` line of /proc/<pid>/status, decoded to capability names by
/// libcap's capsh (independent of any table here).
pub fn capability_set(pid: u32, field: &str) -> Result<BTreeSet<String>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .trim();
    let output = Command::new("capsh")
        .arg(format!("--decode={hex}"))
        .output()
        .context("run capsh (libcap2-bin)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // `0x000000c000001000=cap_net_admin,cap_perfmon,cap_bpf`
    let names = text.trim().split_once('=').map_or("", |(_, names)| names);
    Ok(names
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_ascii_uppercase)
        .collect())
}

/// The `Uid:` or `Gid:` line of /proc/<pid>/status: real, effective, saved
/// and filesystem ids.
pub fn ids(pid: u32, field: &str) -> Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    line.split_whitespace()
        .map(|v| v.parse().with_context(|| format!("{field}: {line}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setpriv_sets_are_exact() {
        let caps: BTreeSet<String> = ["CAP_NET_ADMIN", "CAP_BPF"].map(str::to_owned).into();
        assert_eq!(setpriv_set(&caps), "-all,+bpf,+net_admin");
        assert_eq!(setpriv_set(&BTreeSet::new()), "-all");
    }
}
