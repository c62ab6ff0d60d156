//! Self-tests of the tcpgate-tests support library: the guards work, traffic
//! flows through the namespace topology, and nothing is left behind.
//! Tests that need root call `require_root()` first.

#[path = "selftest/agent.rs"]
mod agent;
#[path = "selftest/keys.rs"]
mod keys;
#[path = "selftest/network.rs"]
mod network;
#[path = "selftest/notify.rs"]
mod notify;
#[path = "selftest/payload.rs"]
mod payload;
#[path = "selftest/processes.rs"]
mod processes;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Names in `ip netns list` (its lines read `name (id: N)` or `name`).
pub fn netns_names() -> Vec<String> {
    let out = tcpgate_tests::cmd::run("ip", ["netns", "list"]).expect("ip netns list");
    out.lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The inode identifying a network namespace file (`/run/netns/x`,
/// `/proc/<pid>/ns/net`).
pub fn ns_inode(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path.as_ref())
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.as_ref().display()))
        .ino()
}

/// Whether `pid` is gone or a zombie, i.e. no longer running.
pub fn not_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}
