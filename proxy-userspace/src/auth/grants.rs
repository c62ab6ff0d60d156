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
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::destination::{Destination, set_contains};
use super::policy::Decision;
use super::token::ValidatedToken;

/// A grant id: random high 32 bits per store (so ids differ across agent
/// restarts) and a counter below. Never zero. Shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantId(pub u64);

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("grant id {0:?} is not 1 to 16 hex digits")]
pub struct BadGrantId(String);

impl FromStr for GrantId {
    type Err = BadGrantId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match u64::from_str_radix(s, 16) {
            Ok(v) if v != 0 && !s.starts_with('+') && s.len() <= 16 => Ok(GrantId(v)),
            _ => Err(BadGrantId(s.to_owned())),
        }
    }
}

impl Serialize for GrantId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GrantId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

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
    pub audit_claims: std::sync::Arc<BTreeMap<String, Value>>,
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

struct Entry {
    grant: Grant,
    deadline: Instant,
}

struct State {
    grants: HashMap<GrantId, Entry>,
    counter: u32,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the expiry task when the set of deadlines changed.
    changed: Notify,
    events: broadcast::Sender<GrantEvent>,
    id_prefix: u64,
    audit_claims: Vec<String>,
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
    /// `audit_claims` names the token claims copied into each grant.
    pub fn new(audit_claims: Vec<String>) -> GrantStore {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        GrantStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    grants: HashMap::new(),
                    counter: 0,
                }),
                changed: Notify::new(),
                events,
                id_prefix: u64::from(rand::random::<u32>()) << 32,
                audit_claims,
            }),
        }
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
            .filter_map(|c| token.claims.get(c).map(|v| (c.clone(), v.clone())))
            .collect()
    }

    /// Drops a grant whose purpose ended (the one session a preamble
    /// admitted), without a revocation event.
    pub fn release(&self, id: GrantId) -> Option<Grant> {
        let removed = self.state().grants.remove(&id).map(|e| e.grant);
        if removed.is_some() {
            self.inner.changed.notify_one();
        }
        removed
    }

    /// Records a grant for `decision` and returns it.
    pub fn create(
        &self,
        kind: GrantKind,
        token: &ValidatedToken,
        decision: &Decision,
        now: SystemTime,
    ) -> Grant {
        let kind = match kind {
            GrantKind::Source { source } => GrantKind::Source {
                source: source.to_canonical(),
            },
            other => other,
        };
        let audit_claims = std::sync::Arc::new(self.audit_claims(token));
        let remaining = decision
            .expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        let mut state = self.state();
        state.counter = state.counter.checked_add(1).unwrap_or(1);
        let id = GrantId(self.inner.id_prefix | u64::from(state.counter));
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
        };
        state.grants.insert(
            id,
            Entry {
                grant: grant.clone(),
                deadline: Instant::now() + remaining,
            },
        );
        drop(state);
        self.inner.changed.notify_one();
        grant
    }

    /// A live source-bound grant of `source` that includes `dest`; the one
    /// lasting longest when several do.
    pub fn covering(&self, source: IpAddr, dest: SocketAddr, now: SystemTime) -> Option<Grant> {
        let source = source.to_canonical();
        self.state()
            .grants
            .values()
            .map(|e| &e.grant)
            .filter(|g| {
                g.source() == Some(source)
                    && g.expires_at > now
                    && set_contains(&g.destinations, dest)
            })
            .max_by_key(|g| g.expires_at)
            .cloned()
    }

    pub fn get(&self, id: GrantId) -> Option<Grant> {
        self.state().grants.get(&id).map(|e| e.grant.clone())
    }

    /// All grants, oldest first.
    pub fn list(&self) -> Vec<Grant> {
        let mut v: Vec<Grant> = self
            .state()
            .grants
            .values()
            .map(|e| e.grant.clone())
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

    /// Removes a grant and broadcasts [`GrantEvent::Revoked`].
    pub fn revoke(&self, id: GrantId) -> Option<Grant> {
        let removed = self.state().grants.remove(&id).map(|e| e.grant);
        if removed.is_some() {
            let _ = self.inner.events.send(GrantEvent::Revoked(id));
            self.inner.changed.notify_one();
        }
        removed
    }

    /// Revokes every grant of `subject`.
    pub fn revoke_subject(&self, subject: &str) -> Vec<Grant> {
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
            ids.iter()
                .filter_map(|id| state.grants.remove(id))
                .map(|e| e.grant)
                .collect()
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
        }
    }
}
