//! The systemd units as files: a reader for `key=value` unit files, and
//! the checks on the staged `tcpgate.service` and `tcpgate-bpffs.service`
//! (install.rs runs them; install_systemd.rs runs the units themselves).

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Result, bail, ensure};

use super::tree::mode;
use super::{PREFIX, Staged};

/// The capabilities the unit must grant, no more (see the unit's comments
/// for why each is needed; the install tests show it).
pub const UNIT_CAPABILITIES: [&str; 3] = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"];

/// The `key=value` lines of a unit file, by section, in order.
#[derive(Debug)]
pub struct Unit {
    entries: Vec<(String, String, String)>,
}

impl Unit {
    pub fn parse(text: &str) -> Result<Self> {
        let mut section = None;
        let mut entries = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(name.to_owned());
                continue;
            }
            ensure!(
                !line.ends_with('\\'),
                "line {}: continuation lines are not expected",
                number + 1
            );
            let Some((key, value)) = line.split_once('=') else {
                bail!("line {}: not key=value: {line}", number + 1);
            };
            let Some(section) = &section else {
                bail!("line {}: {key} outside any section", number + 1);
            };
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        }
        Ok(Self { entries })
    }

    /// Every value of `key` in `section` (keys may repeat).
    pub fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The single value of `key` in `section`.
    pub fn one(&self, section: &str, key: &str) -> Result<&str> {
        match self.all(section, key).as_slice() {
            [value] => Ok(value),
            values => bail!("[{section}] {key}: expected one value, found {values:?}"),
        }
    }

    /// A space-separated list setting as a set.
    pub fn set(&self, section: &str, key: &str) -> Result<BTreeSet<String>> {
        Ok(self
            .one(section, key)?
            .split_whitespace()
            .map(str::to_owned)
            .collect())
    }

    /// The capabilities the unit gives the agent (ambient = bounding set,
    /// which the staging test checks).
    pub fn capabilities(&self) -> Result<BTreeSet<String>> {
        self.set("Service", "AmbientCapabilities")
    }
}

/// The staged `tcpgate.service` says what it must: how the agent runs,
/// with which capabilities and sandboxing, and that every program it
/// runs is there.
pub fn check_service_unit(staged: &Staged) -> Result<()> {
    let unit = staged.unit()?;
    check_how_it_runs(&unit)?;
    check_capabilities(&unit)?;
    check_sandboxing(&unit)?;
    check_programs(&unit, staged)?;
    ensure!(unit.one("Install", "WantedBy")? == "multi-user.target");
    ensure!(unit.one("Unit", "Requires")? == "tcpgate-bpffs.service");
    Ok(())
}

fn check_how_it_runs(unit: &Unit) -> Result<()> {
    let service = |key: &str| unit.one("Service", key);
    ensure!(service("Type")? == "notify" && service("NotifyAccess")? == "main");
    ensure!(
        service("ExecStart")?
            == "/usr/local/bin/tcpgate run --supervise --config /etc/tcpgate/tcpgate.toml"
    );
    ensure!(service("ExecReload")? == "/bin/kill -USR2 $MAINPID");
    ensure!(service("User")? == "tcpgate" && service("Group")? == "tcpgate");
    ensure!(service("SupplementaryGroups")? == "tcpgate-operators");
    Ok(())
}

fn check_capabilities(unit: &Unit) -> Result<()> {
    let wanted: BTreeSet<String> = UNIT_CAPABILITIES.map(str::to_owned).into();
    ensure!(
        unit.set("Service", "AmbientCapabilities")? == wanted,
        "ambient capabilities"
    );
    ensure!(
        unit.set("Service", "CapabilityBoundingSet")? == wanted,
        "bounding set"
    );
    for cap in &wanted {
        let known = Command::new("capsh")
            .arg(format!("--supports={}", cap.to_ascii_lowercase()))
            .status()?;
        ensure!(
            known.success(),
            "{cap} is not a capability this kernel knows"
        );
    }
    Ok(())
}

fn check_sandboxing(unit: &Unit) -> Result<()> {
    let service = |key: &str| unit.one("Service", key);
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "-/sys/fs/bpf/tcpgate"),
        ("LogsDirectory", "tcpgate"),
        ("LogsDirectoryMode", "0750"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0027"),
        ("KillMode", "mixed"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("SystemCallFilter", "@system-service bpf"),
        ("SystemCallErrorNumber", "EPERM"),
    ] {
        ensure!(
            service(key)? == value,
            "{key}={}, want {value}",
            service(key)?
        );
    }
    let families: BTreeSet<String> = ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"]
        .map(str::to_owned)
        .into();
    ensure!(unit.set("Service", "RestrictAddressFamilies")? == families);
    Ok(())
}

fn check_programs(unit: &Unit, staged: &Staged) -> Result<()> {
    ensure!(
        unit.all("Service", "ExecStartPre").contains(
            &"+/usr/bin/install -d -o tcpgate -g tcpgate-operators -m 0750 /sys/fs/bpf/tcpgate"
        ),
        "the unit makes the pin directory as root"
    );
    // Every program the unit runs exists (systemd-analyze verify checks
    // ExecStart only).
    for key in ["ExecStartPre", "ExecStart", "ExecReload"] {
        for line in unit.all("Service", key) {
            let program = line.trim_start_matches(['+', '-', '!', '@', ':']);
            let program = program.split_whitespace().next().unwrap_or_default();
            let on_disk = if program.starts_with(PREFIX) {
                staged.path(program)
            } else {
                program.into()
            };
            ensure!(
                mode(&on_disk)? & 0o111 != 0,
                "{key}: {program} is not executable"
            );
        }
    }
    Ok(())
}

/// The staged `tcpgate-bpffs.service`: bpffs is mounted by a plain service
/// (systemd refuses a .mount unit for it), only where it is missing.
pub fn check_bpffs_unit(staged: &Staged) -> Result<()> {
    let bpffs = Unit::parse(&std::fs::read_to_string(staged.path(&format!(
        "{PREFIX}/lib/systemd/system/tcpgate-bpffs.service"
    )))?)?;
    ensure!(bpffs.one("Unit", "ConditionPathIsMountPoint")? == "!/sys/fs/bpf");
    ensure!(
        bpffs
            .one("Unit", "Before")?
            .split_whitespace()
            .any(|u| u == "tcpgate.service")
    );
    ensure!(
        bpffs.one("Service", "ExecStart")?
            == "/bin/mount -t bpf -o nosuid,nodev,noexec,mode=0700 bpf /sys/fs/bpf"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_reader_keeps_sections_repeats_and_skips_comments() -> Result<()> {
        let unit = Unit::parse(
            "# comment\n[Unit]\nAfter=a.target\n\n[Service]\nExecStartPre=+/bin/true\n\
             ExecStartPre=/bin/false\nAmbientCapabilities=CAP_BPF  CAP_NET_ADMIN\n",
        )?;
        assert_eq!(unit.one("Unit", "After")?, "a.target");
        assert_eq!(
            unit.all("Service", "ExecStartPre"),
            ["+/bin/true", "/bin/false"]
        );
        assert!(unit.one("Service", "ExecStartPre").is_err());
        assert_eq!(
            unit.capabilities()?.into_iter().collect::<Vec<_>>(),
            ["CAP_BPF", "CAP_NET_ADMIN"]
        );
        assert!(Unit::parse("Key=outside\n").is_err());
        Ok(())
    }
}
