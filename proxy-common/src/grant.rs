//! Grants: what a validated token admits, pinned so operators can list them.

use crate::session::SUBJECT_LEN;

/// Bytes of the matched policy rule's name kept in a record.
pub const RULE_NAME_LEN: usize = 32;

/// `GrantRecord::kind`: created by a token preamble on one connection.
pub const GRANT_PREAMBLE: u32 = 1;
/// `GrantRecord::kind`: created through the grant API, bound to a source.
pub const GRANT_SOURCE: u32 = 2;

/// `GrantRecord::flags`: an operator revoked the grant through the pinned
/// map (`tcpgate revoke` while the agent's API was not answering). The
/// agent revokes such a grant as soon as it runs again.
pub const GRANT_FLAG_REVOKED: u32 = 1;

/// Key of a marker record in the `GRANTS` map (grant ids are never 0): an
/// operator flagged grants revoked and the agent has not looked yet. The
/// agent checks this one key instead of scanning the map.
pub const REVOCATIONS_PENDING_KEY: u64 = 0;

/// Value of the pinned `GRANTS` map, keyed by grant id. Written by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    /// The grant id (also the map key).
    pub grant_id: u64,
    /// When the grant was created.
    pub created_unix_ns: u64,
    /// When the grant ends.
    pub expires_unix_ns: u64,
    /// Source address the grant is bound to (`GRANT_SOURCE`), else zero.
    pub source_addr: [u8; 16],
    /// `GRANT_*`.
    pub kind: u32,
    /// `GRANT_FLAG_*`; zero when the agent writes the record.
    pub flags: u32,
    /// Token subject, NUL-padded UTF-8.
    pub subject: [u8; SUBJECT_LEN],
    /// Name of the policy rule that matched, NUL-padded UTF-8.
    pub rule: [u8; RULE_NAME_LEN],
}

const _: () = assert!(size_of::<GrantRecord>() == 24 + 16 + 8 + SUBJECT_LEN + RULE_NAME_LEN);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers and arrays only, no padding (checked above).
unsafe impl aya::Pod for GrantRecord {}
