//! Test support for the privileged integration tests (and the fixtures
//! they share: [`fixture`], [`auth_fixture`], [`operator`], [`firewall`],
//! [`inspect`], [`intercept`], [`clients`], [`install`]; waits go through
//! [`eventually`]).
//!
//! Every resource here is an RAII guard: network namespaces, child processes,
//! the agent, its bpffs pin directory. Guards clean up in `Drop`, also while a
//! failing test unwinds, and never panic there. Names are unique per process
//! and per call ([`unique_name`]) because tests run in parallel threads and
//! across test binaries.
//!
//! Typical use:
//!
//! ```no_run
//! use tcpgate_tests::{require_root, Topology, topology::TARGET_V4};
//! # fn main() -> anyhow::Result<()> {
//! if !require_root() {
//!     return Ok(());
//! }
//! let topo = Topology::new()?;
//! // start servers in topo.target, clients in topo.runner, the agent in topo.bastion
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod at_exit;
pub mod audit;
pub mod auth_fixture;
pub mod bpf_stats;
pub mod bpffs;
pub mod clients;
pub mod cmd;
pub mod etcd;
pub mod firewall;
pub mod fixture;
pub mod held_sockets;
pub mod http;
pub mod inspect;
pub mod install;
pub mod intercept;
pub mod jwks_server;
pub mod metrics;
pub mod moto;
pub mod moved;
pub mod netns;
pub mod notify;
pub mod operator;
pub mod pacing;
pub mod payload;
pub mod poll;
pub mod preamble;
pub mod privileged;
pub mod process;
pub mod routed;
pub mod servers;
pub mod takeover;
pub mod tls;
pub mod tokens;
pub mod topology;

use std::sync::atomic::{AtomicU64, Ordering};

pub use agent::{Agent, AgentBuilder, AgentError};
pub use audit::{AuditError, read_audit, wait_for_audit};
pub use bpffs::PinDir;
pub use clients::{HttpServer, curl, dial_from};
pub use cmd::{CommandError, write_executable};
pub use fixture::{
    COPY_FIRST_BUDGET, DataPath, ForwardFixture, LISTEN_PORT, UPSTREAM_PORT, intercept_config,
    intercept_prefixes, wait_events, wait_events_within,
};
pub use inspect::{
    agent_leftovers, assert_maps_empty, pinned_entries, raise_nofile, routing_leftovers, rss_bytes,
    sk_lookup_links,
};
pub use moved::{assert_bytes, assert_bytes_with};
pub use netns::{Netns, NetnsError, NsThread};
pub use nix::sys::signal::Signal;
pub use notify::{NotifyError, NotifyListener};
pub use payload::{
    Digest, Payload, SlowReader, read_exact_hashed, read_to_end_hashed, write_payload,
};
pub use poll::{NotWithin, eventually};
pub use privileged::require_root;
pub use process::{ChildGuard, ProcessError};
pub use servers::{AcceptLoop, OneShot, ServerError, accept_loop, dial, serve_once};
pub use topology::{Topology, TopologyError};

/// Longest interface name Linux accepts (`IFNAMSIZ - 1`).
pub const MAX_NAME_LEN: usize = 15;

static NAME_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A number never returned before in this process.
pub(crate) fn next_id() -> u64 {
    NAME_COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A name unique to this process and call, at most 15 characters, so it fits
/// interface names too: `<prefix><pid>-<counter>`.
///
/// The prefix is shortened when needed; the pid and counter are never cut,
/// because they are what makes the name unique.
pub fn unique_name(prefix: &str) -> String {
    let n = next_id();
    let suffix = format!("{}-{n}", std::process::id());
    let room = MAX_NAME_LEN.saturating_sub(suffix.len());
    let prefix: String = prefix.chars().take(room).collect();
    format!("{prefix}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_short_and_distinct() {
        let a = unique_name("a-very-long-prefix");
        let b = unique_name("a-very-long-prefix");
        assert!(a.len() <= MAX_NAME_LEN, "{a}");
        assert_ne!(a, b);
        assert!(a.contains(&std::process::id().to_string()), "{a}");
        assert!(unique_name("tg").starts_with("tg"));
    }
}
