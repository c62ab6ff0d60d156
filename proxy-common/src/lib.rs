//! Plain data shared by the eBPF programs (`proxy-ebpf`) and the agent
//! (`proxy-userspace`).
//!
//! Every map key and value here is `#[repr(C)]`, holds only integers and
//! arrays, and spells its padding out as named fields, so that the kernel,
//! the agent and `bpftool` all agree on one layout. Each type carries a
//! compile-time size check.
//!
//! Byte order, for every type in this crate:
//! - addresses (`*_addr`) are 16 bytes in network order; IPv4 is stored
//!   IPv4-mapped (`::ffff:a.b.c.d`);
//! - ports, counters, ids and times are integers in the host's byte order;
//! - times are nanoseconds since the Unix epoch (`CLOCK_REALTIME`).
#![no_std]

// `user` builds (the agent) get std for times; the eBPF programs never do.
#[cfg(feature = "user")]
extern crate std;

pub mod addr;
pub mod grant;
pub mod intercept;
pub mod routed;
pub mod session;
pub mod stats;

/// The first four bytes of a token preamble (`docs/protocol.md`). The
/// agent reads them; the routed program refuses a flow that starts with
/// them, so a token never crosses the bastion unread.
pub const PREAMBLE_MAGIC: [u8; 4] = *b"TCPG";

/// Map names, shared so user space finds what the eBPF object declares.
pub mod map_names {
    /// SOCKHASH of spliced sockets, keyed by socket cookie.
    pub const SOCKHASH: &str = "SOCKHASH";
    /// Socket cookie -> [`crate::session::SocketEntry`].
    pub const SOCKETS: &str = "SOCKETS";
    /// Array of [`crate::session::DirectionMode`], two per session slot.
    pub const DIRECTION_MODES: &str = "DIRECTION_MODES";
    /// Array of `u64`, indexed like `DIRECTION_MODES`: the TCP sequence
    /// number of each direction's next byte (bit 32 set once known).
    pub const STREAM_SEQ: &str = "STREAM_SEQ";
    /// Ring buffer of [`crate::session::WakeEvent`]s for the agent.
    pub const WAKEUPS: &str = "WAKEUPS";
    /// Session id -> [`crate::session::SessionRecord`].
    pub const SESSIONS: &str = "SESSIONS";
    /// Single-slot per-CPU [`crate::stats::GlobalStats`].
    pub const STATS: &str = "STATS";
    /// LPM trie: intercepted prefix -> [`crate::intercept::InterceptValue`].
    pub const INTERCEPT: &str = "INTERCEPT";
    /// SOCKMAP holding the agent's transparent listeners.
    pub const LISTENERS: &str = "LISTENERS";
    /// Grant id -> [`crate::grant::GrantRecord`].
    pub const GRANTS: &str = "GRANTS";
    /// Routed flows: [`crate::routed::FlowKey`] -> [`crate::routed::FlowValue`].
    pub const FLOWS: &str = "FLOWS";
    /// Ring of routed flows' openings and changes, read by the agent.
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    /// Routed sources: IPv4 octets -> [`crate::routed::RoutedSource`].
    pub const ROUTED_SOURCES: &str = "ROUTED_SOURCES";
    /// Single-slot [`crate::routed::RoutedConfig`].
    pub const ROUTED_CONFIG: &str = "ROUTED_CONFIG";
    /// Single-slot per-CPU [`crate::routed::RoutedStats`].
    pub const ROUTED_STATS: &str = "ROUTED_STATS";
}

/// Program names, as the eBPF object exports them.
pub mod program_names {
    /// `sk_skb/stream_verdict`: splices each direction to the peer socket.
    pub const VERDICT: &str = "tcpgate_verdict";
    /// `sk_lookup`: steers intercepted SYNs to the agent's listener.
    pub const LOOKUP: &str = "tcpgate_lookup";
    /// tc ingress on the runner-facing interfaces: routes granted SYNs'
    /// flows and counts runner -> target.
    pub const ROUTED_IN: &str = "tcpgate_routed_in";
    /// tc egress on the runner-facing interfaces: counts target -> runner.
    pub const ROUTED_OUT: &str = "tcpgate_routed_out";
    /// A tc program never attached: the agent runs it (`BPF_PROG_TEST_RUN`)
    /// to remove finished flows from `FLOWS` (see `routed::SweepEntry`).
    pub const ROUTED_SWEEP: &str = "tcpgate_routed_sweep";
    /// A tc program never attached: the agent runs it to end a flow whose
    /// grant expired or was revoked, in place (see `routed::END_FRAME`).
    pub const ROUTED_END: &str = "tcpgate_routed_end";
}
