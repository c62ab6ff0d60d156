//! The gate's grants. Every change to the grant store goes through these
//! methods, so the pinned `grants` map follows it without callers pairing
//! "change the store" with "mirror it" by hand.

use std::sync::Arc;
use std::time::SystemTime;

use super::{Gate, MirrorFull};
use crate::auth::aws;
use crate::auth::token_cache::{self, Stamp, TokenCacheStats};
use crate::auth::{
    CreateError, Decision, Grant, GrantId, GrantKind, TokenError, ValidatedToken, Verified,
};

/// Why no grant was created.
#[derive(Debug, thiserror::Error)]
pub enum GrantRefused {
    /// The store refused it: the token was revoked or a cap is reached.
    #[error(transparent)]
    Store(#[from] CreateError),
    /// The pinned map cannot hold it; the store dropped it again.
    #[error(transparent)]
    MapFull(#[from] MirrorFull),
}

impl Gate {
    /// Validates a bearer token against the configured issuers, or finds
    /// it verified already under the same keys and revocations.
    /// The result is shared with the cache: the connections of one token
    /// share its claims and what grants derive from them.
    pub async fn validate(&self, token: &str) -> Result<Arc<Verified>, TokenError> {
        // A signed STS request is good for one use (the validator remembers
        // its signature): a cache hit would let its replay through.
        if token.starts_with(aws::TOKEN_PREFIX) {
            return self.validator.validate(token).await.map(Verified::new);
        }
        let digest = token_cache::digest(token);
        let stamp = Stamp {
            keys: self.validator.keys_version(),
            revocations: self.store.revocation_epoch(),
        };
        if let Some(verified) = self.tokens.get(&digest, stamp, SystemTime::now()) {
            return Ok(verified);
        }
        let verified = Verified::new(self.validator.validate(token).await?);
        self.tokens
            .insert(digest, &verified, stamp, SystemTime::now());
        Ok(verified)
    }

    /// The verified-token cache's counters, for metrics.
    #[must_use]
    pub fn token_cache_stats(&self) -> TokenCacheStats {
        self.tokens.stats()
    }

    /// Registers the token validator's metrics (key fetches, STS calls).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.validator.register(registry);
    }

    /// Whether the token's subject or jti was revoked.
    #[must_use]
    pub fn refuses(&self, token: &ValidatedToken, now: SystemTime) -> bool {
        self.store.refuses(token, now)
    }

    /// Creates a grant bound to `source` and mirrors it into the pinned map.
    pub fn create_source_grant(
        &self,
        token: &Verified,
        decision: &Decision,
        source: std::net::IpAddr,
        now: SystemTime,
    ) -> Result<Grant, GrantRefused> {
        self.create_grant(GrantKind::Source { source }, token, decision, now)
    }

    /// Creates a grant in the store and mirrors it into the pinned map. A
    /// grant the map cannot hold is dropped again: operators reading the
    /// map must see every grant, so none may live outside it.
    pub(super) fn create_grant(
        &self,
        kind: GrantKind,
        token: &Verified,
        decision: &Decision,
        now: SystemTime,
    ) -> Result<Grant, GrantRefused> {
        let grant = self.store.create(kind, token, decision, now)?;
        if let Some(mirror) = &self.mirror
            && let Err(e) = mirror.insert(&grant)
        {
            self.store.release(grant.id);
            tracing::warn!(grant = %grant.id, error = %e, "grant refused: the pinned grants map is full");
            return Err(e.into());
        }
        if grant.source().is_some() {
            self.grants_changed();
        }
        Ok(grant)
    }

    /// Ends a preamble grant with its one session.
    pub fn release(&self, id: GrantId) {
        self.store.release(id);
        self.forget(id);
    }

    /// Gives grant `id` back for the token that holds it (same issuer and
    /// subject); false when there is no such grant for that token.
    pub fn give_back(&self, id: GrantId, token: &ValidatedToken) -> bool {
        match self.store.get(id) {
            Some(grant) if grant.issuer == token.issuer && grant.subject == token.subject => {
                self.store.give_back(id);
                true
            }
            _ => false,
        }
    }

    /// Revokes one grant; the store's revocation event removes it from the
    /// pinned map and ends its sessions.
    pub fn revoke(&self, id: GrantId) -> Option<Grant> {
        let revoked = self.store.revoke(id);
        self.grants_changed();
        revoked
    }

    /// Revokes every grant of a token subject (see [`Self::revoke`]).
    pub fn revoke_subject(&self, subject: &str) -> Vec<Grant> {
        let revoked = self.store.revoke_subject(subject);
        self.grants_changed();
        let _ = self.subject_revocations.send(super::SubjectRevocation {
            subject: subject.to_owned(),
            holds: self.store.holds_of(subject),
            revoked_at: SystemTime::now(),
        });
        revoked
    }

    /// Subjects revoked here from now on (see [`Self::revoke_subject`]).
    #[must_use]
    pub fn subject_revocations(
        &self,
    ) -> tokio::sync::broadcast::Receiver<super::SubjectRevocation> {
        self.subject_revocations.subscribe()
    }

    /// The grant store's expiry and revocation events (a successor forwards
    /// revocations to the agent it took over, whose sessions drain).
    #[must_use]
    pub fn grant_events(&self) -> tokio::sync::broadcast::Receiver<crate::auth::GrantEvent> {
        self.store.subscribe()
    }

    /// The live grant `id`, if any.
    #[must_use]
    pub fn grant(&self, id: GrantId) -> Option<std::sync::Arc<Grant>> {
        self.store.get(id)
    }

    /// When grant `id` expires, if it is live: a check on every poll of
    /// every routed flow, so it copies nothing.
    #[must_use]
    pub fn grant_expires_at(&self, id: GrantId) -> Option<SystemTime> {
        self.store.expires_at(id)
    }

    /// Whether grant `id` is live.
    #[must_use]
    pub fn holds(&self, id: GrantId) -> bool {
        self.store.contains(id)
    }

    /// Every live grant.
    #[must_use]
    pub fn grants(&self) -> Vec<Grant> {
        self.store.list()
    }

    /// The deny list, handed to a successor agent on a takeover.
    #[must_use]
    pub fn revocations(&self) -> crate::auth::revocations::RevocationSnapshot {
        self.store.revocations()
    }

    /// Merges a predecessor's deny list (before serving: a token it
    /// revoked is refused here from the first connection).
    pub fn restore_revocations(&self, snapshot: &crate::auth::revocations::RevocationSnapshot) {
        self.store.restore_revocations(snapshot);
    }

    /// How many grants are live.
    #[must_use]
    pub fn live_grants(&self) -> usize {
        self.store.len()
    }

    /// Whether grants are mirrored into a pinned map (eBPF loaded).
    #[must_use]
    pub fn mirrors_grants(&self) -> bool {
        self.mirror.is_some()
    }

    /// Removes an ended grant from the pinned map (on the store's expiry
    /// and revocation events).
    ///
    /// An operator's revoked flag outlives the record: `tcpgate revoke`
    /// falls back to the pinned map when the API does not answer, but its
    /// API request may still be served once the agent runs again, and
    /// revoke the grant here before a session sees its destroyed socket.
    /// That session still ends `revoked` (see [`Self::revoked_outside`]).
    pub fn forget(&self, id: GrantId) {
        if let Some(mirror) = &self.mirror {
            if mirror.is_flagged_revoked(id) {
                self.lock_revoked().insert(id.0);
            }
            mirror.remove(id);
        }
    }

    /// If an operator flagged `id` revoked in the pinned map, revokes it in
    /// the store (ending its sessions) and returns true.
    pub fn apply_outside_revocation(&self, id: GrantId) -> bool {
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
            .filter(|&id| self.apply_outside_revocation(GrantId(id)))
            .count()
    }

    /// Whether `id` was revoked through the pinned map (flag seen now or
    /// earlier).
    ///
    /// The flag first, the set second: [`Self::apply_outside_revocation`]
    /// adds to the set before the revocation removes the flagged record,
    /// so a check racing it sees one or the other. The other order could
    /// miss both (the set read just before the insert, the map just after
    /// the removal).
    #[must_use]
    pub fn revoked_outside(&self, id: u64) -> bool {
        self.mirror
            .as_ref()
            .is_some_and(|mirror| mirror.is_flagged_revoked(GrantId(id)))
            || self.lock_revoked().contains(&id)
    }

    fn lock_revoked(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.outside_revocations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
