//! bpffs at /sys/fs/bpf, where the agent pins its maps and links.

use std::fs;
use std::process::Command;

use anyhow::{Context as _, Result};

use super::report;
use crate::cmd;
use crate::host::Host;

const STEP: &str = "bpffs";
const MOUNT_POINT: &str = "/sys/fs/bpf";

pub fn ensure(host: &Host) -> Result<()> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    if is_bpffs_mounted(&mounts) {
        report(STEP, format!("already mounted at {MOUNT_POINT}"));
        return Ok(());
    }
    if !host.is_root {
        // Only the privileged tests and the agent need it, and both run as
        // root, so a plain build goes on without it.
        report(
            STEP,
            format!("not mounted at {MOUNT_POINT}; as root: mount -t bpf bpf {MOUNT_POINT}"),
        );
        return Ok(());
    }
    report(STEP, format!("mounting at {MOUNT_POINT}"));
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", MOUNT_POINT]))
}

/// True when a `/proc/self/mounts` line has a bpf filesystem on /sys/fs/bpf.
pub fn is_bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(MOUNT_POINT) && fstype == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_bpf_mount_on_sys_fs_bpf() {
        let mounts = "sysfs /sys sysfs rw,nosuid 0 0\n\
                      bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0\n";
        assert!(is_bpffs_mounted(mounts));
    }

    #[test]
    fn other_filesystems_or_places_do_not_count() {
        let sysfs_only = "sysfs /sys sysfs rw,nosuid 0 0\n";
        let tmpfs_there = "tmpfs /sys/fs/bpf tmpfs rw 0 0\n";
        let bpf_elsewhere = "bpf /run/bpf bpf rw 0 0\n";
        assert!(!is_bpffs_mounted(sysfs_only));
        assert!(!is_bpffs_mounted(tmpfs_there));
        assert!(!is_bpffs_mounted(bpf_elsewhere));
        assert!(!is_bpffs_mounted(""));
    }
}
