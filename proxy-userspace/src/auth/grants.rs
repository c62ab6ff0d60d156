//! Live grants: what an authenticated token may reach, until when.
//!
//! A preamble grant covers one connection; a source grant (created through
//! the grant API) covers every new connection from one source address to
//! its destinations. When a grant ends (expiry or revocation) a
//! [`GrantEvent`] is broadcast so the agent can tear its sessions down.
//!
//! Expiry is timed on the monotonic clock: [`GrantStore::run_expiry`] sleeps
//! until the earliest deadline (computed at creation from `expires_at`), so
//! a grant ends at its instant, not on the next tick of a coarse timer.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::destination::{Destination, set_contains};
pub use super::grant_id::{BadGrantId, GrantId};
pub use super::grant_table::{CreateError, GrantLimit};
use super::grant_table::{Entry, State};
use super::limits::AuthLimits;
use super::policy::Decision;
use super::revocations::{ANY_ISSUER, Identity, token_jti};
use super::token::ValidatedToken;

/// How a grant was obtained. Serialized flat: `"kind": "source", "source": ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GrantKind {
    /// A token preamble on one connection.
    Preamble,
    /// The grant API: covers new connections from `source`.
    Source { source: IpAddr },
}

/// One grant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grant {
    pub id: GrantId,
    #[serde(flatten)]
    pub kind: GrantKind,
    pub subject: String,
    pub issuer: String,
    pub rule: String,
    #[serde(with = "humantime_serde")]
    pub created_at: SystemTime,
    #[serde(with = "humantime_serde")]
    pub expires_at: SystemTime,
    pub destinations: Vec<Destination>,
    /// The configured `audit_claims` present in the token; shared with the
    /// sessions under the grant.
    pub audit_claims: crate::audit::AuditClaims,
    /// The token's `jti`, denied on revocation so the token cannot ask again.
    #[serde(skip)]
    pub jti: Option<String>,
    /// The token's own `exp` (the grant may end sooner).
    #[serde(skip)]
    pub token_expires_at: SystemTime,
}

impl Grant {
    /// The source address of a source-bound grant.
    pub fn source(&self) -> Option<IpAddr> {
        match self.kind {
            GrantKind::Source { source } => Some(source),
            GrantKind::Preamble => None,
        }
    }
}

/// A grant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantEvent {
    Expired(GrantId),
    Revoked(GrantId),
}

const EVENT_CAPACITY: usize = 1024;

mod fleet;

struct Inner {
    state: Mutex<State>,
    /// Wakes the expiry task when the set of deadlines changed.
    changed: Notify,
    events: broadcast::Sender<GrantEvent>,
    audit_claims: Vec<String>,
    caps: AuthLimits,
}

/// The grant table. Cheap to clone; all clones share it.
#[derive(Clone)]
pub struct GrantStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for GrantStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrantStore")
            .field("grants", &self.len())
            .finish_non_exhaustive()
    }
}

impl GrantStore {
    /// `audit_claims` names the token claims copied into each grant; the
    /// grant caps are the defaults.
    pub fn new(audit_claims: Vec<String>) -> GrantStore {
        Self::with_limits(audit_claims, AuthLimits::default())
    }

    /// Like [`GrantStore::new`], with the caps of `limits`.
    pub fn with_limits(audit_claims: Vec<String>, limits: AuthLimits) -> GrantStore {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        GrantStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                events,
                audit_claims,
                caps: limits,
            }),
        }
    }

    /// The deny list, for a successor agent.
    #[must_use]
    pub fn revocations(&self) -> super::revocations::RevocationSnapshot {
        self.state().revocations.snapshot()
    }

    /// Merges a predecessor's deny list.
    pub fn restore_revocations(&self, snapshot: &super::revocations::RevocationSnapshot) {
        self.state().revocations.restore(snapshot);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every update is a single insert/remove), so keep going.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token's claims that audit lines carry (never the token itself).
    pub fn audit_claims(&self, token: &ValidatedToken) -> BTreeMap<String, Value> {
        self.inner
            .audit_claims
            .iter()
            // Paths, as in rules: `aws.role`, `kubernetes.io.namespace`.
            .filter_map(|c| super::claims::lookup(&token.claims, c).map(|v| (c.clone(), v.clone())))
            .collect()
    }

    /// Moves whenever a token or identity is denied (see
    /// [`super::token_cache`]).
    pub fn revocation_epoch(&self) -> u64 {
        self.state().revocations.epoch()
    }

    /// Notes a validated token and says whether a revocation refuses it.
    pub fn refuses(&self, token: &ValidatedToken, now: SystemTime) -> bool {
        let mut state = self.state();
        state.revocations.saw(token, now);
        state.revocations.refuses(token, now)
    }

    /// Drops a grant whose purpose ended (the one session a preamble
    /// admitted, or a runner giving its grant back), without a deny entry.
    pub fn release(&self, id: GrantId) -> Option<Grant> {
        let removed = self.state().take(id);
        if removed.is_some() {
            self.inner.changed.notify_one();
        }
        removed
    }

    /// Records a grant for `decision` and returns it; refused when the
    /// token was revoked or a cap on source grants is reached (checked
    /// under the same lock as revocations, so none slips in between).
    pub fn create(
        &self,
        kind: GrantKind,
        token: &super::Verified,
        decision: &Decision,
        now: SystemTime,
    ) -> Result<Grant, CreateError> {
        let kind = match kind {
            GrantKind::Source { source } => GrantKind::Source {
                source: source.to_canonical(),
            },
            other => other,
        };
        // Once per token, shared by all its grants (see `claims_memo`).
        let audit_claims = token.audit_claims(|t| self.audit_claims(t));
        let remaining = decision
            .expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        let mut state = self.state();
        state.revocations.saw(token, now);
        if state.revocations.refuses(token, now) {
            return Err(CreateError::Revoked);
        }
        if let GrantKind::Source { source } = kind {
            let who = (token.issuer.clone(), token.subject.clone());
            state
                .check_caps(&self.inner.caps, &who, source)
                .map_err(CreateError::Limit)?;
        }
        let id = state.fresh_id();
        let grant = Grant {
            id,
            kind,
            subject: token.subject.clone(),
            issuer: token.issuer.clone(),
            rule: decision.rule.clone(),
            created_at: now,
            expires_at: decision.expires_at,
            destinations: decision.destinations.clone(),
            audit_claims,
            jti: token_jti(token),
            token_expires_at: token.expires_at,
        };
        state.insert(Entry {
            grant: std::sync::Arc::new(grant.clone()),
            deadline: Instant::now() + remaining,
        });
        drop(state);
        self.inner.changed.notify_one();
        Ok(grant)
    }

    /// A live source-bound grant of `source` that includes `dest`; the one
    /// lasting longest when several do.
    pub fn covering(
        &self,
        source: IpAddr,
        dest: SocketAddr,
        now: SystemTime,
    ) -> Option<std::sync::Arc<Grant>> {
        let source = source.to_canonical();
        let state = self.state();
        state
            .by_source
            .get(&source)?
            .iter()
            .filter_map(|id| state.grants.get(id))
            .map(|e| &e.grant)
            .filter(|g| g.expires_at > now && set_contains(&g.destinations, dest))
            .max_by_key(|g| g.expires_at)
            .map(std::sync::Arc::clone)
    }

    /// The live grant `id`, shared rather than copied.
    pub fn get(&self, id: GrantId) -> Option<std::sync::Arc<Grant>> {
        self.state()
            .grants
            .get(&id)
            .map(|e| std::sync::Arc::clone(&e.grant))
    }

    /// When `id` expires, if it is live (no copy of the grant).
    pub fn expires_at(&self, id: GrantId) -> Option<SystemTime> {
        self.state().grants.get(&id).map(|e| e.grant.expires_at)
    }

    /// Whether `id` is live (cheaper than [`GrantStore::get`]).
    pub fn contains(&self, id: GrantId) -> bool {
        self.state().grants.contains_key(&id)
    }

    /// All grants, oldest first.
    pub fn list(&self) -> Vec<Grant> {
        let mut v: Vec<Grant> = self
            .state()
            .grants
            .values()
            .map(|e| Grant::clone(&e.grant))
            .collect();
        v.sort_by_key(|g| (g.created_at, g.id));
        v
    }

    pub fn len(&self) -> usize {
        self.state().grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Revokes a grant: removes it, denies its token (by `jti`, when it
    /// has one) until the token's `exp`, and broadcasts
    /// [`GrantEvent::Revoked`].
    pub fn revoke(&self, id: GrantId) -> Option<Grant> {
        let removed = {
            let mut state = self.state();
            let removed = state.take(id);
            if let Some(g) = &removed
                && let Some(jti) = &g.jti
            {
                state
                    .revocations
                    .deny_token(&g.issuer, jti, g.token_expires_at);
            }
            removed
        };
        if removed.is_some() {
            let _ = self.inner.events.send(GrantEvent::Revoked(id));
            self.inner.changed.notify_one();
        }
        removed
    }

    /// Ends a grant its own holder gave back: its sessions end as
    /// revoked, but the token is not denied.
    pub fn give_back(&self, id: GrantId) -> Option<Grant> {
        let removed = self.state().take(id);
        if removed.is_some() {
            let _ = self.inner.events.send(GrantEvent::Revoked(id));
            self.inner.changed.notify_one();
        }
        removed
    }

    /// Revokes every grant of `subject`, under every issuer, and denies
    /// those identities until the latest `exp` seen for each: the same
    /// tokens are refused from now on.
    pub fn revoke_subject(&self, subject: &str) -> Vec<Grant> {
        let now = SystemTime::now();
        let mut state = self.state();
        let mut holds: HashMap<Identity, SystemTime> = HashMap::new();
        for who in state.revocations.seen_with_subject(subject) {
            holds.entry(who).or_insert(now);
        }
        for e in state.grants.values().filter(|e| e.grant.subject == subject) {
            let until = holds
                .entry((e.grant.issuer.clone(), e.grant.subject.clone()))
                .or_insert(now);
            *until = (*until).max(e.grant.token_expires_at);
        }
        if holds.is_empty() {
            // No token of this subject seen yet: deny it under any issuer.
            holds.insert((ANY_ISSUER.to_owned(), subject.to_owned()), now);
        }
        for (who, until) in holds {
            state.revocations.deny_identity(who, until, now);
        }
        drop(state);
        self.remove_where(|e| e.grant.subject == subject, GrantEvent::Revoked)
    }

    /// Removes grants whose `expires_at` is at or before `now` and
    /// broadcasts [`GrantEvent::Expired`] for each.
    pub fn remove_expired(&self, now: SystemTime) -> Vec<Grant> {
        self.remove_where(|e| e.grant.expires_at <= now, GrantEvent::Expired)
    }

    fn remove_where(
        &self,
        pred: impl Fn(&Entry) -> bool,
        event: fn(GrantId) -> GrantEvent,
    ) -> Vec<Grant> {
        let mut removed: Vec<Grant> = {
            let mut state = self.state();
            let ids: Vec<GrantId> = state
                .grants
                .iter()
                .filter(|(_, e)| pred(e))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| state.take(*id)).collect()
        };
        removed.sort_by_key(|g| (g.expires_at, g.id));
        for g in &removed {
            let _ = self.inner.events.send(event(g.id));
        }
        if !removed.is_empty() {
            self.inner.changed.notify_one();
        }
        removed
    }

    /// Receives an event for every grant that ends from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<GrantEvent> {
        self.inner.events.subscribe()
    }

    /// Expires grants at their deadlines until `shutdown` resolves. Run it
    /// once per store (spawn `store.clone().run_expiry(shutdown)`).
    pub async fn run_expiry(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let next = self.state().grants.values().map(|e| e.deadline).min();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => return,
                // A new grant may expire before the one we sleep for:
                // notify_one keeps a permit, so no change is missed.
                () = self.inner.changed.notified() => continue,
                () = sleep => {}
            }
            let now = Instant::now();
            self.remove_where(|e| e.deadline <= now, GrantEvent::Expired);
            self.state().revocations.sweep(SystemTime::now());
        }
    }
}
