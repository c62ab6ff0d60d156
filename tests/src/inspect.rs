//! What the agent leaves in the kernel and the system, read from outside:
//! pinned map entries (bpftool), policy-routing rules and routes, sk_lookup
//! links, a process's resident memory; and the fd limit tests raise.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// Entries of a pinned map, via Debian's bpftool.
pub fn pinned_entries(pin_dir: &Path, map: &str) -> Result<Vec<Value>> {
    let path = pin_dir.join(map);
    let output = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .context("run bpftool (apt install bpftool)")?;
    ensure!(
        output.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let entries: Vec<Value> = serde_json::from_slice(&output.stdout).context("bpftool JSON")?;
    Ok(entries)
}

pub fn assert_maps_empty(pin_dir: &Path) -> Result<()> {
    for map in ["sessions", "sockets"] {
        let entries = pinned_entries(pin_dir, map)?;
        ensure!(
            entries.is_empty(),
            "{map} map still holds {} entries: {entries:?}",
            entries.len()
        );
    }
    Ok(())
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("VmRSS")?;
    Ok(kib * 1024)
}

/// Raises this process's open-files limit (1,000 sessions need ~2,000 fds).
pub fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// tcpgate's policy-routing state in a namespace: rules with its protocol
/// number and routes in its table.
pub fn routing_leftovers(ns: &crate::Netns) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for family in ["-4", "-6"] {
        let rules = ns.exec_ok(&["ip", family, "rule", "show"])?;
        left.extend(
            rules
                .lines()
                .filter(|l| l.contains("proto 213"))
                .map(|l| format!("rule {l}")),
        );
        let routes = ns.exec_ok(&["ip", family, "route", "show", "table", "all"])?;
        left.extend(
            routes
                .lines()
                .filter(|l| l.contains("proto 213"))
                .map(|l| format!("route {l}")),
        );
    }
    Ok(left)
}

/// sk_lookup links attached to a namespace (by its inode), via bpftool.
pub fn sk_lookup_links(ns: &crate::Netns) -> Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(ns.path())?.ino();
    let output = std::process::Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()?;
    ensure!(
        output.status.success(),
        "bpftool link show: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let links: Vec<Value> = serde_json::from_slice(&output.stdout)?;
    Ok(links
        .iter()
        .filter(|l| l["type"] == "netns" && l["netns_ino"] == inode)
        .count())
}

/// What a stopped agent left in its namespace and on bpffs: its ip rules
/// and routes, sk_lookup links, and its pin directory.
pub fn agent_leftovers(ns: &crate::Netns, pin_dir: &Path) -> Result<Vec<String>> {
    let mut left = routing_leftovers(ns)?;
    let links = sk_lookup_links(ns)?;
    if links > 0 {
        left.push(format!("{links} sk_lookup link(s)"));
    }
    if pin_dir.exists() {
        left.push(format!("pin directory {}", pin_dir.display()));
    }
    Ok(left)
}
