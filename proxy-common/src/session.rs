//! Per-session records: what the verdict program needs to splice a socket,
//! and what operators read from the pinned `sessions` map.

/// `SocketEntry::direction` of the client socket: its bytes go upstream.
pub const DIRECTION_UP: u32 = 0;
/// `SocketEntry::direction` of the upstream socket: its bytes go to the client.
pub const DIRECTION_DOWN: u32 = 1;

/// `DirectionMode::mode`: the verdict redirects the socket's bytes to the peer.
pub const MODE_REDIRECT: u32 = 0;
/// `DirectionMode::mode`: the verdict passes the socket's bytes to its own
/// receive queue, charged to its receive buffer (so TCP's window closes),
/// for the agent to copy: backpressure when the peer cannot keep up.
pub const MODE_PASS: u32 = 1;

/// `DirectionMode::mode`: like [`MODE_PASS`], until the direction's
/// `passed_bytes` equals `DirectionMode::resume_at` (the agent has copied
/// every passed byte); the verdict then switches the mode back to
/// [`MODE_REDIRECT`] itself, at an skb boundary, so no byte overtakes another.
pub const MODE_RESUME: u32 = 2;

/// `SessionRecord::datapath`: bytes are spliced by the verdict program.
pub const DATAPATH_EBPF: u32 = 1;
/// `SessionRecord::datapath`: bytes are copied by the agent (so far: a
/// session copied before its splice gets a new record at the splice); the
/// record's counters stay 0, the agent's operator endpoint has them.
pub const DATAPATH_USERSPACE: u32 = 2;

/// `SessionRecord::auth_method`: no authentication (static forward).
pub const AUTH_NONE: u16 = 0;
/// `SessionRecord::auth_method`: an in-band token preamble.
pub const AUTH_PREAMBLE: u16 = 1;
/// `SessionRecord::auth_method`: a grant bound to the client's source address.
pub const AUTH_SOURCE_GRANT: u16 = 2;

/// Bytes of the token subject kept in a record (NUL-padded, truncated).
pub const SUBJECT_LEN: usize = 64;

/// Value of the `SOCKETS` map, keyed by the socket's cookie (`SO_COOKIE`).
///
/// Written once, when the socket joins the splice, and never rewritten:
/// updating an existing key of a preallocated hash map hands the old
/// element's memory to the next update at once, while a verdict on another
/// CPU may still be reading it (a torn entry once sent a client's skb back
/// to the client). What changes while a session runs lives in the
/// `DIRECTION_MODES` array, which is updated in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketEntry {
    /// Cookie of the socket that receives this socket's bytes.
    pub peer_cookie: u64,
    /// Key of the session's record in the `SESSIONS` map.
    pub session_id: u64,
    /// [`DIRECTION_UP`] or [`DIRECTION_DOWN`].
    pub direction: u32,
    /// Index of this direction's [`DirectionMode`] in `DIRECTION_MODES`.
    pub mode_index: u32,
}

/// Value of the `DIRECTION_MODES` array: how the verdict treats one
/// direction of a session. User space writes it whole; the verdict only
/// switches `mode` from [`MODE_RESUME`] to [`MODE_REDIRECT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionMode {
    /// [`MODE_REDIRECT`], [`MODE_PASS`] or [`MODE_RESUME`].
    pub mode: u32,
    /// Explicit padding; zero.
    pub _pad: u32,
    /// With [`MODE_RESUME`]: the direction's `passed_bytes` at which the
    /// verdict resumes redirecting.
    pub resume_at: u64,
    /// With [`MODE_REDIRECT`]: once the direction's `kernel_bytes` reach
    /// this, the verdict posts a [`WakeEvent`] (once: it sets this to
    /// `u64::MAX`), so the agent looks at a direction that starts moving
    /// fast without polling idle sessions.
    pub wake_at: u64,
}

/// Record of the `WAKEUPS` ring buffer: a direction moved enough bytes
/// that the agent should look at its backlog now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WakeEvent {
    /// Key of the session's record in the `SESSIONS` map.
    pub session_id: u64,
    /// [`DIRECTION_UP`] or [`DIRECTION_DOWN`].
    pub direction: u32,
    /// Explicit padding; zero.
    pub _pad: u32,
}

/// Traffic counters of one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionCounters {
    /// Payload bytes the verdict program redirected to the peer.
    pub kernel_bytes: u64,
    /// Non-empty skbs the verdict program redirected.
    pub kernel_packets: u64,
    /// Skbs that could not be redirected (the peer left the map).
    pub redirect_failures: u64,
    /// Payload bytes the agent wrote itself (the user-space data path).
    pub userspace_bytes: u64,
    /// Payload bytes the verdict passed to their own socket (backpressure)
    /// for the agent to copy.
    pub passed_bytes: u64,
    /// Times the verdict took the direction back from the agent after
    /// backpressure (`MODE_RESUME` to `MODE_REDIRECT`).
    pub handbacks: u64,
}

impl DirectionCounters {
    /// All payload bytes moved in this direction, by either path.
    #[must_use]
    pub const fn total_bytes(&self) -> u64 {
        self.kernel_bytes + self.userspace_bytes
    }

    /// What a live record in the `SESSIONS` map says has left the source
    /// socket: redirected by the kernel, or passed to the agent to copy
    /// under backpressure. (User space never rewrites a live record, so its
    /// `userspace_bytes` are only known when the session ends.)
    #[must_use]
    pub const fn live_bytes(&self) -> u64 {
        self.kernel_bytes + self.passed_bytes
    }
}

/// Value of the pinned `SESSIONS` map, keyed by session id.
///
/// User space writes the whole record before the sockets enter the
/// SOCKHASH (and may have written a copied session's record earlier, see
/// [`DATAPATH_USERSPACE`]); after that only the verdict program writes the
/// kernel counters (each direction from its own socket's receive path,
/// which the kernel runs one skb at a time per socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session id (also the map key), unique per agent run.
    pub session_id: u64,
    /// Grant that admitted the session; 0 when none was needed.
    pub grant_id: u64,
    /// When the agent accepted the client.
    pub started_unix_ns: u64,
    /// When the grant ends and the session is torn down; 0 for never.
    pub expires_unix_ns: u64,
    /// The client's address, as the bastion saw it.
    pub client_addr: [u8; 16],
    /// The destination the client dialled (the original destination).
    pub dest_addr: [u8; 16],
    /// Where the agent connected upstream (differs when a prefix is mapped).
    pub upstream_addr: [u8; 16],
    /// The client's port.
    pub client_port: u16,
    /// The original destination port.
    pub dest_port: u16,
    /// The upstream port.
    pub upstream_port: u16,
    /// `AUTH_*`: how the session was admitted.
    pub auth_method: u16,
    /// `DATAPATH_*`: which path moves the bytes.
    pub datapath: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// Token subject (`sub`), NUL-padded UTF-8; empty when unauthenticated.
    pub subject: [u8; SUBJECT_LEN],
    /// Client to upstream.
    pub up: DirectionCounters,
    /// Upstream to client.
    pub down: DirectionCounters,
}

impl SessionRecord {
    /// A record with every field zero.
    #[must_use]
    pub const fn zeroed() -> Self {
        Self {
            session_id: 0,
            grant_id: 0,
            started_unix_ns: 0,
            expires_unix_ns: 0,
            client_addr: [0; 16],
            dest_addr: [0; 16],
            upstream_addr: [0; 16],
            client_port: 0,
            dest_port: 0,
            upstream_port: 0,
            auth_method: 0,
            datapath: 0,
            _pad: 0,
            subject: [0; SUBJECT_LEN],
            up: DirectionCounters {
                kernel_bytes: 0,
                kernel_packets: 0,
                redirect_failures: 0,
                userspace_bytes: 0,
                passed_bytes: 0,
                handbacks: 0,
            },
            down: DirectionCounters {
                kernel_bytes: 0,
                kernel_packets: 0,
                redirect_failures: 0,
                userspace_bytes: 0,
                passed_bytes: 0,
                handbacks: 0,
            },
        }
    }
}

const _: () = assert!(size_of::<SocketEntry>() == 24);
const _: () = assert!(size_of::<DirectionMode>() == 24);
const _: () = assert!(size_of::<WakeEvent>() == 16);
const _: () = assert!(size_of::<DirectionCounters>() == 48);
const _: () = assert!(size_of::<SessionRecord>() == 256);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers and arrays only, no implicit padding (checked above).
unsafe impl aya::Pod for SocketEntry {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers and arrays only, no implicit padding (checked above).
unsafe impl aya::Pod for DirectionMode {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no implicit padding (checked above).
unsafe impl aya::Pod for WakeEvent {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers and arrays only, no implicit padding (checked above).
unsafe impl aya::Pod for SessionRecord {}
