//! Admission: who may open a session to a destination.
//!
//! With `[auth]` configured, a connection is admitted by a live grant bound
//! to its source address, or by a token preamble in its first bytes, read
//! with a deadline and a size bound and validated against policy. Until
//! then the agent makes no upstream connection and sends nothing upstream.

mod admitted;
pub use admitted::Admitted;
mod fleet;
mod grants;
pub use grants::GrantRefused;
mod mirror;
pub mod opening;
pub mod pending;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use proxy_common::session::{AUTH_PREAMBLE, AUTH_SOURCE_GRANT};
use std::os::fd::AsFd as _;

use tokio::net::TcpStream;

use crate::auth::limits::AuthLimits;
use crate::auth::preamble::{self, PreambleError, Status};
use crate::auth::token_cache::TokenCache;
use crate::auth::{
    DenyReason, Grant, GrantKind, GrantStore, Policy, TokenValidator, ValidatedToken,
};
use crate::datapath::PartlyRead;
pub use mirror::{GrantMirror, MirrorFull, grant_record};
use opening::FirstBytes;

/// Everything admission needs; shared by all accept loops.
pub struct Gate {
    validator: TokenValidator,
    /// Tokens verified before, so a job's next connections skip the
    /// signature check.
    tokens: TokenCache,
    /// Replaced whole on SIGHUP; in-flight decisions keep the one they read.
    policy: std::sync::RwLock<std::sync::Arc<Policy>>,
    store: GrantStore,
    pub preamble_timeout: Duration,
    pub limits: AuthLimits,
    /// Connections waiting for their admission decision.
    pub pending: std::sync::Arc<pending::Pending>,
    /// The pinned `grants` map, when eBPF is loaded.
    mirror: Option<GrantMirror>,
    /// Grants an operator revoked through the pinned map while the API was
    /// not answering; their sessions' sockets were destroyed from outside,
    /// so those sessions end as `revoked`, not as a peer closing.
    outside_revocations: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// Subject revocations made here, for an agent draining after a
    /// takeover (its preamble grants are not this store's).
    subject_revocations: tokio::sync::broadcast::Sender<SubjectRevocation>,
    /// Called with the live grants after a source grant is created or
    /// revoked (routed grants keep the kernel's sources in step with it
    /// before the API answers).
    grants_changed: std::sync::OnceLock<GrantsChanged>,
}

/// See [`Gate::on_grants_changed`].
pub type GrantsChanged = Box<dyn Fn(&[Grant]) + Send + Sync>;

/// A subject revoked here, with the deny holds it left (what another
/// agent applies with [`Gate::revoke_subject_held`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SubjectRevocation {
    pub subject: String,
    pub holds: Vec<(crate::auth::revocations::Identity, std::time::SystemTime)>,
    pub revoked_at: std::time::SystemTime,
}

/// A connection the gate refused.
#[derive(Debug)]
pub struct Refusal {
    /// Stable reason for audit and metrics, e.g. `token_expired`.
    pub reason: DenyReason,
    /// For people: what exactly was wrong. Goes to the audit line only.
    pub detail: String,
    /// Who the token named, when it was valid but not allowed.
    pub subject: Option<String>,
    pub claims: BTreeMap<String, serde_json::Value>,
    /// Tell the client (it spoke the preamble protocol). Generic on
    /// purpose: rule names, audience and upstream stay in the audit line.
    pub answer: Option<(Status, String)>,
}

impl Refusal {
    fn new(reason: DenyReason, detail: impl Into<String>) -> Self {
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

    /// A pending connection shed by a newer one over `bound`.
    #[must_use]
    pub fn shed(bound: pending::Bound) -> Self {
        Self::new(
            DenyReason::PendingShed,
            format!(
                "shed as the oldest pending connection ([auth.limits] {} reached)",
                bound.as_str()
            ),
        )
    }

    /// Answers `denied` with the stable reason code only.
    fn denied(self) -> Self {
        let message = format!("access denied ({})", self.reason);
        self.answered(Status::Denied, message)
    }
}

fn admitted(grant: &Grant, method: u16) -> Admitted {
    Admitted {
        grant_id: grant.id.0,
        subject: grant.subject.as_str().into(),
        expires: Some(grant.expires_at),
        auth_method: method,
        claims: grant.audit_claims.clone(),
        answer_preamble: method == AUTH_PREAMBLE,
        opening_unseen: false,
        relayed_down: 0,
        partly_read: PartlyRead::No,
    }
}

fn preamble_refusal(e: &PreambleError) -> Refusal {
    let refusal = Refusal::new(e.deny_reason(), e.to_string());
    match e {
        // The client speaks the protocol: tell it what was wrong with the
        // bytes it sent itself.
        PreambleError::UnsupportedVersion(_)
        | PreambleError::BadFlags(_)
        | PreambleError::Oversized { .. } => refusal.answered(Status::Error, e.to_string()),
        _ => refusal,
    }
}

/// Subject revocations kept for a slow forwarder (an operator's pace).
const SUBJECT_EVENTS: usize = 256;

impl Gate {
    #[must_use]
    pub fn new(
        validator: TokenValidator,
        policy: Policy,
        store: GrantStore,
        preamble_timeout: Duration,
        limits: AuthLimits,
        mirror: Option<GrantMirror>,
    ) -> Self {
        Self {
            validator,
            tokens: TokenCache::new(limits.token_cache_entries),
            policy: std::sync::RwLock::new(std::sync::Arc::new(policy)),
            store,
            preamble_timeout,
            pending: pending::Pending::new(limits.pending_connections, limits.pending_per_source),
            limits,
            mirror,
            outside_revocations: std::sync::Mutex::default(),
            subject_revocations: tokio::sync::broadcast::channel(SUBJECT_EVENTS).0,
            grants_changed: std::sync::OnceLock::new(),
        }
    }

    /// Registers the one hook called after grants change (see
    /// [`Gate::grants_changed`]); a second registration is ignored.
    pub fn on_grants_changed(&self, hook: GrantsChanged) {
        let _ = self.grants_changed.set(hook);
    }

    fn grants_changed(&self) {
        if let Some(hook) = self.grants_changed.get() {
            hook(&self.store.list());
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
        // A source grant admits without a preamble, but a client holding
        // one may still send a preamble (`tcpgate connect`): wait a short
        // while for the first bytes, so a preamble is read here and never
        // reaches the upstream. Silence admits (the server may speak
        // first); the session looks again once the upstream is connected.
        if let Some(grant) = self.store.covering(peer.ip(), destination, now) {
            if self.apply_outside_revocation(grant.id) {
                return Err(Refusal::new(
                    DenyReason::GrantRevoked,
                    format!("grant {} was revoked through the pinned map", grant.id),
                ));
            }
            let wait = self.limits.grant_first_bytes_wait();
            match opening::first_bytes(client, wait, self.preamble_timeout).await {
                FirstBytes::Protocol => return Ok(admitted(&grant, AUTH_SOURCE_GRANT)),
                // (`first_bytes` never sees the upstream; judged later like silence.)
                FirstBytes::Silent | FirstBytes::UpstreamFirst => {
                    let mut admitted = admitted(&grant, AUTH_SOURCE_GRANT);
                    admitted.opening_unseen = true;
                    return Ok(admitted);
                }
                FirstBytes::Preamble => {}
                FirstBytes::Stuck => {
                    return Err(Refusal::new(
                        DenyReason::PreambleIncomplete,
                        "the first bytes began like a preamble and stopped",
                    ));
                }
            }
        }
        self.admit_preamble(client, destination).await
    }

    /// For a session admitted by its grant before the client said
    /// anything: once the upstream is connected, waits for the first side
    /// to speak; a late preamble is read and judged here instead of being
    /// spliced upstream.
    pub async fn settle_opening(
        &self,
        client: &mut TcpStream,
        upstream: &TcpStream,
        destination: SocketAddr,
        admitted: Admitted,
    ) -> Result<Admitted, Refusal> {
        if !admitted.opening_unseen {
            return Ok(admitted);
        }
        match opening::first_speaker(client, upstream, self.preamble_timeout).await {
            FirstBytes::Silent | FirstBytes::Protocol => Ok(admitted),
            FirstBytes::Preamble => self.admit_preamble(client, destination).await,
            FirstBytes::Stuck => Err(Refusal::new(
                DenyReason::PreambleIncomplete,
                "the first bytes began like a preamble and stopped",
            )),
            FirstBytes::UpstreamFirst => {
                self.settle_after_greeting(client, upstream, admitted).await
            }
        }
    }

    /// The upstream spoke before a granted client did: its greeting is
    /// relayed until the client's first bytes are seen. A preamble then is
    /// refused (the client has already read upstream bytes, so it cannot be
    /// answered), and its token never reaches the upstream.
    async fn settle_after_greeting(
        &self,
        client: &mut TcpStream,
        upstream: &TcpStream,
        admitted: Admitted,
    ) -> Result<Admitted, Refusal> {
        let Some(greeting) = opening::relay_greeting(client, upstream, self.preamble_timeout).await
        else {
            return Err(Refusal::new(
                DenyReason::GreetingNotRead,
                "the client did not read the upstream's first bytes within auth.preamble_timeout",
            ));
        };
        match greeting.client {
            FirstBytes::Preamble | FirstBytes::Stuck => Err(Refusal::new(
                DenyReason::LatePreamble,
                "a granted client sent a token preamble after the upstream had spoken; \
                 refused so that the token never reaches the upstream",
            )),
            _ => Ok(Admitted {
                relayed_down: greeting.relayed,
                // The relay's last read may have cut an upstream segment
                // (at the greeting's limit) when more is queued behind it.
                partly_read: if greeting.relayed > 0 {
                    PartlyRead::if_queued(upstream.as_fd())
                } else {
                    PartlyRead::No
                },
                ..admitted
            }),
        }
    }

    /// Reads, validates and judges a token preamble.
    async fn admit_preamble(
        &self,
        client: &mut TcpStream,
        destination: SocketAddr,
    ) -> Result<Admitted, Refusal> {
        let max_token = self.limits.max_token_len();
        let request = preamble::read_preamble(client, self.preamble_timeout, max_token)
            .await
            .map_err(|e| preamble_refusal(&e))?;
        // Looked at before the answer: a client that waits for it has sent
        // nothing more, one that sent its data along may have left the
        // rest of a segment the agent read part of.
        let partly_read = PartlyRead::if_queued(client.as_fd());
        let token = self
            .validate(&request.token)
            .await
            .map_err(|e| Refusal::new(e.deny_reason(), e.to_string()).denied())?;
        let now = SystemTime::now();
        if self.store.refuses(&token, now) {
            return Err(self.identified(
                DenyReason::Revoked,
                "the token's subject or jti was revoked",
                &token,
            ));
        }
        let decision = self
            .policy()
            .decide(&token, destination, now)
            .map_err(|d| self.identified(d.deny_reason(), d.to_string(), &token))?;
        if decision.expires_at <= now {
            return Err(self.identified(
                DenyReason::TokenExpired,
                "the token expires within the configured leeway",
                &token,
            ));
        }
        let grant = self
            .create_grant(GrantKind::Preamble, &token, &decision, now)
            .map_err(|e| match e {
                GrantRefused::Store(e) => self.identified(e.deny_reason(), e.to_string(), &token),
                GrantRefused::MapFull(e) => {
                    Refusal::new(DenyReason::GrantTableFull, crate::error_chain(&e))
                        .answered(Status::Error, "the agent is at capacity; retry later")
                }
            })?;
        Ok(Admitted {
            partly_read,
            ..admitted(&grant, AUTH_PREAMBLE)
        })
    }

    /// A denial of a valid token, with who it named for the audit line.
    fn identified(
        &self,
        reason: DenyReason,
        detail: impl Into<String>,
        token: &ValidatedToken,
    ) -> Refusal {
        let mut refusal = Refusal::new(reason, detail);
        refusal.subject = Some(token.subject.clone());
        refusal.claims = self.store.audit_claims(token);
        refusal.denied()
    }
}
