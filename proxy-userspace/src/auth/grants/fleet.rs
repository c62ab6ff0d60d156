//! What a fleet of bastions asks of the store: grants and revocations made
//! on another bastion, applied here (see `crate::cluster`).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use tokio::time::Instant;

use super::{CreateError, Grant, GrantEvent, GrantKind, GrantLimit, GrantStore};
use crate::auth::grant_table::Entry;
use crate::auth::revocations::Identity;
use crate::auth::token::ValidatedToken;

/// What the deny list knows of a grant's token: its identity, `jti` and
/// `exp` (the fleet's record carries no other claim).
fn token_of(grant: &Grant) -> ValidatedToken {
    let mut claims = Map::new();
    if let Some(jti) = &grant.jti {
        claims.insert("jti".to_owned(), Value::String(jti.clone()));
    }
    ValidatedToken {
        issuer: grant.issuer.clone(),
        subject: grant.subject.clone(),
        expires_at: grant.token_expires_at,
        claims,
    }
}

impl GrantStore {
    /// Installs a source grant another bastion issued. `Ok(false)` when it
    /// is already here (this bastion's own, seen again from the watch) or
    /// already expired. Refused when its token was revoked here, or when
    /// `max_grants` is reached: the per-subject and per-source caps were
    /// checked by the issuing bastion, which holds the fleet's grants too.
    pub fn install(&self, grant: Grant, now: SystemTime) -> Result<bool, CreateError> {
        let Ok(remaining) = grant.expires_at.duration_since(now) else {
            return Ok(false);
        };
        if remaining.is_zero() || !matches!(grant.kind, GrantKind::Source { .. }) {
            return Ok(false);
        }
        let mut state = self.state();
        if state.grants.contains_key(&grant.id) {
            return Ok(false);
        }
        if state.revocations.refuses(&token_of(&grant), now) {
            return Err(CreateError::Revoked);
        }
        if state.by_source.values().map(Vec::len).sum::<usize>() >= self.inner.caps.max_grants {
            return Err(CreateError::Limit(GrantLimit::Total));
        }
        state.insert(Entry {
            grant: std::sync::Arc::new(grant),
            deadline: Instant::now() + remaining,
        });
        drop(state);
        self.inner.changed.notify_one();
        Ok(true)
    }

    /// Revokes `subject` as another bastion did at `revoked_at`: each
    /// identity is denied until the later of its hold there and what this
    /// bastion saw (a token issued before `revoked_at` extends its hold, as
    /// on the revoking bastion); every grant of the subject here ends.
    pub fn revoke_subject_held(
        &self,
        subject: &str,
        holds: &[(Identity, SystemTime)],
        revoked_at: SystemTime,
    ) -> Vec<Grant> {
        {
            let mut state = self.state();
            let mut all: HashMap<Identity, SystemTime> = holds.iter().cloned().collect();
            for who in state.revocations.seen_with_subject(subject) {
                all.entry(who).or_insert(revoked_at);
            }
            for (who, until) in all {
                state.revocations.deny_identity(who, until, revoked_at);
            }
        }
        self.remove_where(|e| e.grant.subject == subject, GrantEvent::Revoked)
    }

    /// The deny entries in force for `subject` (after
    /// [`GrantStore::revoke_subject`]), for the fleet's revocation record.
    #[must_use]
    pub fn holds_of(&self, subject: &str) -> Vec<(Identity, SystemTime)> {
        self.state().revocations.holds_with_subject(subject)
    }

    /// Denies one token (`iss`, `jti`) until `until`, as another bastion's
    /// revocation of a single grant did.
    pub fn deny_token(&self, issuer: &str, jti: &str, until: SystemTime) {
        self.state().revocations.deny_token(issuer, jti, until);
    }

    /// Ends a grant that ended elsewhere in the fleet (given back, or
    /// revoked): its sessions end as revoked; any deny entry comes with the
    /// revocation's own record.
    pub fn end(&self, id: super::GrantId) -> Option<Grant> {
        self.give_back(id)
    }

    /// Ends source grants the fleet no longer holds (a full resync after a
    /// disconnection): those not in `live`, unless they expire within
    /// `slack` (the expiry timer ends those as expired).
    pub fn end_missing(
        &self,
        live: &std::collections::HashSet<super::GrantId>,
        slack: Duration,
    ) -> Vec<Grant> {
        let soon = SystemTime::now() + slack;
        self.remove_where(
            |e| {
                let g = &e.grant;
                g.source().is_some() && !live.contains(&g.id) && g.expires_at > soon
            },
            GrantEvent::Revoked,
        )
    }
}
