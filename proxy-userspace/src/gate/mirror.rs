//! The pinned `grants` map, mirrored from the grant store.

use crate::auth::{Grant, GrantKind};

/// The pinned map is full: the grant is refused rather than hidden from
/// operators who read the map.
#[derive(Debug, thiserror::Error)]
#[error("cannot pin grant record (grants map full?)")]
pub struct MirrorFull(#[source] aya::maps::MapError);

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
    pub fn insert(&self, grant: &Grant) -> Result<(), MirrorFull> {
        let record = grant_record(grant);
        self.lock()
            .insert(grant.id.0, record, 0)
            .map_err(MirrorFull)
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

/// The plain-data record of a grant.
#[must_use]
pub fn grant_record(grant: &Grant) -> proxy_common::grant::GrantRecord {
    use proxy_common::addr::{fill_str, ip_octets, unix_ns};
    use proxy_common::grant::{GRANT_PREAMBLE, GRANT_SOURCE, GrantRecord, RULE_NAME_LEN};
    use proxy_common::session::SUBJECT_LEN;
    let (kind, source_addr) = match grant.kind {
        GrantKind::Preamble => (GRANT_PREAMBLE, [0u8; 16]),
        GrantKind::Source { source } => (GRANT_SOURCE, ip_octets(source.to_canonical())),
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
