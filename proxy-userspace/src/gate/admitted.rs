//! Who a connection was admitted as: what the gate hands the session.

use std::time::SystemTime;

use proxy_common::session::AUTH_NONE;

use crate::datapath::PartlyRead;

/// Who the connection was admitted as.
#[derive(Debug, Clone, Default)]
pub struct Admitted {
    pub grant_id: u64,
    /// Shared with the session's metadata and its registry entry.
    pub subject: std::sync::Arc<str>,
    pub expires: Option<SystemTime>,
    /// `proxy_common::session::AUTH_*`.
    pub auth_method: u16,
    /// Shared with the grant: sessions under one grant do not copy it.
    pub claims: crate::audit::AuditClaims,
    /// The client sent a preamble and waits for the agent's answer.
    pub answer_preamble: bool,
    /// Admitted by a source grant before the client sent anything: its
    /// first bytes are judged once the upstream is connected (a late
    /// preamble must never be spliced upstream).
    pub opening_unseen: bool,
    /// Upstream bytes the agent relayed to the client before the splice
    /// (a server-first greeting to a granted client not yet judged).
    pub relayed_down: u64,
    /// The agent read a preamble or a greeting from a socket that still
    /// holds bytes: the splice must not take them as they are.
    pub partly_read: PartlyRead,
}

impl Admitted {
    /// A connection that needs no authentication (no `[auth]`).
    #[must_use]
    pub fn unauthenticated() -> Self {
        Self {
            auth_method: AUTH_NONE,
            ..Self::default()
        }
    }
}
