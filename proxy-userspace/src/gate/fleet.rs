//! The gate's side of a fleet: grants and revocations another bastion
//! made, applied through the same store and pinned map as local ones.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use super::{Gate, GrantRefused};
use crate::auth::revocations::Identity;
use crate::auth::{Grant, GrantId};

impl Gate {
    /// Installs a source grant issued elsewhere in the fleet and mirrors it
    /// into the pinned map; `Ok(false)` when it is already here or expired.
    pub fn install(&self, grant: Grant) -> Result<bool, GrantRefused> {
        let id = grant.id;
        let mirrored = grant.clone();
        if !self.store.install(grant, SystemTime::now())? {
            return Ok(false);
        }
        if let Some(mirror) = &self.mirror
            && let Err(e) = mirror.insert(&mirrored)
        {
            self.store.release(id);
            return Err(e.into());
        }
        Ok(true)
    }

    /// Ends a grant that ended elsewhere (given back or revoked there).
    pub fn end_grant(&self, id: GrantId) -> Option<Grant> {
        self.store.end(id)
    }

    /// Applies another bastion's revocation of `subject`.
    pub fn revoke_subject_held(
        &self,
        subject: &str,
        holds: &[(Identity, SystemTime)],
        revoked_at: SystemTime,
    ) -> Vec<Grant> {
        self.store.revoke_subject_held(subject, holds, revoked_at)
    }

    /// The deny entries of `subject` now in force.
    #[must_use]
    pub fn subject_holds(&self, subject: &str) -> Vec<(Identity, SystemTime)> {
        self.store.holds_of(subject)
    }

    /// Denies one token until `until` (another bastion revoked its grant).
    pub fn deny_token(&self, issuer: &str, jti: &str, until: SystemTime) {
        self.store.deny_token(issuer, jti, until);
    }

    /// Ends source grants that are no longer in the fleet's store.
    pub fn end_missing(&self, live: &HashSet<GrantId>, slack: Duration) -> Vec<Grant> {
        self.store.end_missing(live, slack)
    }
}
