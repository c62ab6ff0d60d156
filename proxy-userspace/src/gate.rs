//! Admission: who may open a session to a destination.
//!
//! With `[auth]` configured, a connection is admitted by a live grant bound
//! to its source address, or by a token preamble in its first bytes, read
//! with a deadline and a size bound and validated against policy. Until
//! then the agent makes no upstream connection and sends nothing upstream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use proxy_common::session::{AUTH_PREAMBLE, AUTH_SOURCE_GRANT};
use tokio::net::TcpStream;

use crate::auth::preamble::{self, MAGIC, PreambleError, Status, VERSION};
use crate::auth::{Grant, GrantKind, GrantStore, Policy, TokenValidator, ValidatedToken};
use crate::session::Admitted;

/// Everything admission needs; shared by all accept loops.
pub struct Gate {
    pub validator: TokenValidator,
    /// Replaced whole on SIGHUP; in-flight decisions keep the one they read.
    policy: std::sync::RwLock<std::sync::Arc<Policy>>,
    pub store: GrantStore,
    pub preamble_timeout: Duration,
    /// The pinned `grants` map, when eBPF is loaded.
    pub mirror: Option<GrantMirror>,
    /// Grants an operator revoked through the pinned map while the API was
    /// not answering; their sessions' sockets were destroyed from outside,
    /// so those sessions end as `revoked`, not as a peer closing.
    pub outside_revocations: std::sync::Mutex<std::collections::HashSet<u64>>,
}

/// A connection the gate refused.
#[derive(Debug)]
pub struct Refusal {
    /// Stable reason for audit and metrics, e.g. `token_expired`.
    pub reason: &'static str,
    /// For people: what exactly was wrong.
    pub detail: String,
    /// Who the token named, when it was valid but not allowed.
    pub subject: Option<String>,
    pub claims: BTreeMap<String, serde_json::Value>,
    /// Tell the client why (it spoke the preamble protocol).
    pub answer: Option<(Status, String)>,
}

impl Refusal {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            subject: None,
            claims: BTreeMap::new(),
            answer: None,
        }
    }

    fn answered(mut self, status: Status, message: impl Into<String>) -> Self {
        self.answer = Some((status, message.into()));
        self
    }
}

fn admitted(grant: &Grant, method: u16) -> Admitted {
    Admitted {
        grant_id: grant.id.0,
        subject: grant.subject.clone(),
        expires: Some(grant.expires_at),
        auth_method: method,
        claims: std::sync::Arc::clone(&grant.audit_claims),
        answer_preamble: method == AUTH_PREAMBLE,
    }
}

/// Whether the client has already sent the start of a preamble (never waits).
fn preamble_pending(client: &TcpStream) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    let mut head = [0u8; 5];
    match recv(
        client.as_raw_fd(),
        &mut head,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(n) => n == head.len() && head[..4] == MAGIC && head[4] == VERSION,
        Err(_) => false,
    }
}

impl Gate {
    #[must_use]
    pub fn new(
        validator: TokenValidator,
        policy: Policy,
        store: GrantStore,
        preamble_timeout: Duration,
        mirror: Option<GrantMirror>,
    ) -> Self {
        Self {
            validator,
            policy: std::sync::RwLock::new(std::sync::Arc::new(policy)),
            store,
            preamble_timeout,
            mirror,
            outside_revocations: std::sync::Mutex::default(),
        }
    }

    /// The policy in force.
    #[must_use]
    pub fn policy(&self) -> std::sync::Arc<Policy> {
        std::sync::Arc::clone(
            &self
                .policy
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Switches to a new policy (SIGHUP). Grants already given keep their
    /// terms; revoke them to apply a tighter policy at once.
    pub fn set_policy(&self, policy: Policy) {
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(policy);
    }

    /// Decides whether `client` may reach `destination`.
    pub async fn admit(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
        destination: SocketAddr,
    ) -> Result<Admitted, Refusal> {
        let now = SystemTime::now();
        // A source grant admits at once, without waiting for bytes: the
        // server may be the one to speak first. A preamble already sent
        // anyway (a `tcpgate connect` client holding a grant) is still
        // consumed, so it never reaches the upstream.
        if let Some(grant) = self.store.covering(peer.ip(), destination, now) {
            if self.apply_outside_revocation(grant.id) {
                return Err(Refusal::new(
                    "grant_revoked",
                    format!("grant {} was revoked through the pinned map", grant.id),
                ));
            }
            if !preamble_pending(client) {
                return Ok(admitted(&grant, AUTH_SOURCE_GRANT));
            }
        }
        let request = preamble::read_preamble(client, self.preamble_timeout)
            .await
            .map_err(|e| {
                let refusal = Refusal::new(e.reason(), e.to_string());
                match e {
                    // The client speaks the protocol: tell it what went wrong.
                    PreambleError::UnsupportedVersion(_)
                    | PreambleError::BadFlags(_)
                    | PreambleError::Oversized { .. } => {
                        refusal.answered(Status::Error, e.to_string())
                    }
                    _ => refusal,
                }
            })?;
        let token = self.validator.validate(&request.token).await.map_err(|e| {
            Refusal::new(e.reason(), e.to_string())
                .answered(Status::Denied, format!("token rejected: {e}"))
        })?;
        let decision = self
            .policy()
            .decide(&token, destination, now)
            .map_err(|d| {
                with_identity(Refusal::new(d.reason(), d.to_string()), &token, &self.store)
                    .answered(Status::Denied, format!("not allowed: {d}"))
            })?;
        if decision.expires_at <= now {
            return Err(with_identity(
                Refusal::new(
                    "token_expired",
                    "the token expires within the configured leeway",
                ),
                &token,
                &self.store,
            )
            .answered(Status::Denied, "token rejected: token expired"));
        }
        let grant = self.record(
            self.store
                .create(GrantKind::Preamble, &token, &decision, now),
        );
        Ok(admitted(&grant, AUTH_PREAMBLE))
    }

    /// Mirrors a new grant into the pinned map and returns it.
    pub fn record(&self, grant: Grant) -> Grant {
        if let Some(mirror) = &self.mirror {
            mirror.insert(&grant);
        }
        grant
    }

    /// Removes an ended grant from the pinned map.
    pub fn forget(&self, id: crate::auth::GrantId) {
        if let Some(mirror) = &self.mirror {
            mirror.remove(id);
        }
    }

    /// If an operator flagged `id` revoked in the pinned map, revokes it in
    /// the store (ending its sessions) and returns true.
    pub fn apply_outside_revocation(&self, id: crate::auth::GrantId) -> bool {
        let flagged = self
            .mirror
            .as_ref()
            .is_some_and(|mirror| mirror.is_flagged_revoked(id));
        if flagged {
            self.lock_revoked().insert(id.0);
            if let Some(grant) = self.store.revoke(id) {
                tracing::warn!(grant = %id, subject = %grant.subject, "grant revoked through the pinned map (tcpgate revoke while the API was not answering)");
            }
        }
        flagged || self.lock_revoked().contains(&id.0)
    }

    /// Applies every revocation flagged in the pinned map, if an operator
    /// left the marker saying there are some; returns how many.
    pub fn apply_outside_revocations(&self) -> usize {
        let Some(mirror) = &self.mirror else {
            return 0;
        };
        // The marker goes first: a flag set after this scan comes with a
        // new marker, seen at the next check.
        if !mirror.take_pending_marker() {
            return 0;
        }
        mirror
            .flagged_revoked()
            .into_iter()
            .filter(|&id| self.apply_outside_revocation(crate::auth::GrantId(id)))
            .count()
    }

    /// Whether `id` was revoked through the pinned map (flag seen now or
    /// earlier).
    #[must_use]
    pub fn revoked_outside(&self, id: u64) -> bool {
        self.lock_revoked().contains(&id)
            || self
                .mirror
                .as_ref()
                .is_some_and(|mirror| mirror.is_flagged_revoked(crate::auth::GrantId(id)))
    }

    fn lock_revoked(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.outside_revocations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn with_identity(mut refusal: Refusal, token: &ValidatedToken, store: &GrantStore) -> Refusal {
    refusal.subject = Some(token.subject.clone());
    refusal.claims = store.audit_claims(token);
    refusal
}

/// Keeps the pinned `grants` map in step with the grant store, so operators
/// see grants without asking the agent.
pub struct GrantMirror {
    map: std::sync::Mutex<
        aya::maps::HashMap<aya::maps::MapData, u64, proxy_common::grant::GrantRecord>,
    >,
}

impl GrantMirror {
    #[must_use]
    pub fn new(
        map: aya::maps::HashMap<aya::maps::MapData, u64, proxy_common::grant::GrantRecord>,
    ) -> Self {
        Self {
            map: std::sync::Mutex::new(map),
        }
    }

    /// Adds or replaces a grant's record.
    pub fn insert(&self, grant: &Grant) {
        let record = grant_record(grant);
        if let Err(e) = self.lock().insert(grant.id.0, record, 0) {
            tracing::warn!(grant = %grant.id, error = %e, "cannot pin grant record (grants map full?)");
        }
    }

    pub fn remove(&self, id: crate::auth::GrantId) {
        let _ = self.lock().remove(&id.0);
    }

    /// Whether an operator set [`GRANT_FLAG_REVOKED`] on this grant's record.
    ///
    /// [`GRANT_FLAG_REVOKED`]: proxy_common::grant::GRANT_FLAG_REVOKED
    #[must_use]
    pub fn is_flagged_revoked(&self, id: crate::auth::GrantId) -> bool {
        self.lock()
            .get(&id.0, 0)
            .is_ok_and(|r| r.flags & proxy_common::grant::GRANT_FLAG_REVOKED != 0)
    }

    /// Whether an operator left the revocations-pending marker; removes it.
    #[must_use]
    pub fn take_pending_marker(&self) -> bool {
        self.lock()
            .remove(&proxy_common::grant::REVOCATIONS_PENDING_KEY)
            .is_ok()
    }

    /// Ids of every record an operator flagged revoked.
    #[must_use]
    pub fn flagged_revoked(&self) -> Vec<u64> {
        self.lock()
            .iter()
            .filter_map(Result::ok)
            .filter(|(id, r)| {
                *id != proxy_common::grant::REVOCATIONS_PENDING_KEY
                    && r.flags & proxy_common::grant::GRANT_FLAG_REVOKED != 0
            })
            .map(|(id, _)| id)
            .collect()
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        aya::maps::HashMap<aya::maps::MapData, u64, proxy_common::grant::GrantRecord>,
    > {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn unix_ns(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The plain-data record of a grant.
#[must_use]
pub fn grant_record(grant: &Grant) -> proxy_common::grant::GrantRecord {
    use proxy_common::addr::{fill_str, v4_mapped};
    use proxy_common::grant::{GRANT_PREAMBLE, GRANT_SOURCE, GrantRecord, RULE_NAME_LEN};
    use proxy_common::session::SUBJECT_LEN;
    let (kind, source_addr) = match grant.kind {
        GrantKind::Preamble => (GRANT_PREAMBLE, [0u8; 16]),
        GrantKind::Source { source } => (
            GRANT_SOURCE,
            match source.to_canonical() {
                std::net::IpAddr::V4(v4) => v4_mapped(v4.octets()),
                std::net::IpAddr::V6(v6) => v6.octets(),
            },
        ),
    };
    let mut record = GrantRecord {
        grant_id: grant.id.0,
        created_unix_ns: unix_ns(grant.created_at),
        expires_unix_ns: unix_ns(grant.expires_at),
        source_addr,
        kind,
        flags: 0,
        subject: [0; SUBJECT_LEN],
        rule: [0; RULE_NAME_LEN],
    };
    fill_str(&mut record.subject, &grant.subject);
    fill_str(&mut record.rule, &grant.rule);
    record
}
