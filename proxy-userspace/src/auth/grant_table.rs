//! The grant table behind the store's lock: grants, their indexes by
//! source and by token identity, the caps, and the revocation deny list.

use super::DenyReason;
use std::collections::HashMap;
use std::net::IpAddr;

use tokio::time::Instant;

use super::grant_id::GrantId;
use super::grants::Grant;
use super::limits::AuthLimits;
use super::revocations::{Identity, Revocations};

/// A bound on source grants that a new one would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantLimit {
    PerSubject,
    PerSource,
    Total,
}

impl GrantLimit {
    /// The config field (under `[auth.limits]`) and metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerSubject => "grants_per_subject",
            Self::PerSource => "grants_per_source",
            Self::Total => "max_grants",
        }
    }
}

/// Why no grant was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("the token's subject was revoked")]
    Revoked,
    #[error("the {} limit is reached", .0.as_str())]
    Limit(GrantLimit),
}

impl CreateError {
    /// Stable reason for audit lines, metrics and API errors.
    #[must_use]
    pub fn reason(self) -> &'static str {
        self.deny_reason().as_str()
    }

    #[must_use]
    pub fn deny_reason(self) -> DenyReason {
        match self {
            Self::Revoked => DenyReason::Revoked,
            Self::Limit(_) => DenyReason::GrantLimit,
        }
    }
}

pub(super) struct Entry {
    /// Behind a pointer: the table's buckets (allocated ahead, up to twice
    /// the live grants) stay small, about 100 bytes per grant less at
    /// 10,000. Shared: a routed flow holds its grant without a copy.
    pub(super) grant: std::sync::Arc<Grant>,
    pub(super) deadline: Instant,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) grants: HashMap<GrantId, Entry>,
    /// Source grants by source address: a connection looks at its own
    /// source's few grants, never at every grant.
    pub(super) by_source: HashMap<IpAddr, Vec<GrantId>>,
    /// Source grants per token identity.
    per_identity: HashMap<Identity, usize>,
    pub(super) revocations: Revocations,
}

impl State {
    fn source_grants(&self) -> usize {
        self.by_source.values().map(Vec::len).sum()
    }

    pub(super) fn check_caps(
        &self,
        caps: &AuthLimits,
        who: &Identity,
        source: IpAddr,
    ) -> Result<(), GrantLimit> {
        if self.per_identity.get(who).copied().unwrap_or(0) >= caps.grants_per_subject {
            Err(GrantLimit::PerSubject)
        } else if self.by_source.get(&source).map_or(0, Vec::len) >= caps.grants_per_source {
            Err(GrantLimit::PerSource)
        } else if self.source_grants() >= caps.max_grants {
            Err(GrantLimit::Total)
        } else {
            Ok(())
        }
    }

    /// A random id no live grant has: ids are not a counter, so one
    /// grant's id says nothing about another's.
    pub(super) fn fresh_id(&self) -> GrantId {
        loop {
            let id = GrantId(rand::random());
            // 0 is the pinned map's marker key.
            if id.0 != 0 && !self.grants.contains_key(&id) {
                return id;
            }
        }
    }

    pub(super) fn insert(&mut self, entry: Entry) {
        let grant = &entry.grant;
        if let Some(source) = grant.source() {
            self.by_source.entry(source).or_default().push(grant.id);
            *self
                .per_identity
                .entry((grant.issuer.clone(), grant.subject.clone()))
                .or_default() += 1;
        }
        self.grants.insert(grant.id, entry);
    }

    /// Removes a grant and its index entries.
    pub(super) fn take(&mut self, id: GrantId) -> Option<Grant> {
        let grant = std::sync::Arc::unwrap_or_clone(self.grants.remove(&id)?.grant);
        if let Some(source) = grant.source() {
            if let Some(ids) = self.by_source.get_mut(&source) {
                ids.retain(|g| *g != id);
                if ids.is_empty() {
                    self.by_source.remove(&source);
                }
            }
            let who = (grant.issuer.clone(), grant.subject.clone());
            if let Some(n) = self.per_identity.get_mut(&who) {
                *n -= 1;
                if *n == 0 {
                    self.per_identity.remove(&who);
                }
            }
        }
        Some(grant)
    }
}
