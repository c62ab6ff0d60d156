//! The fleet's records in etcd, under `[cluster] prefix`:
//!
//! - `<prefix>grants/<grant id>`: a source grant, on a lease whose TTL is
//!   the grant's remaining lifetime;
//! - `<prefix>revocations/<random id>`: a revocation (a subject, or one
//!   grant's token), on a lease lasting until the latest `exp` it covers.
//!
//! Values are JSON, times in Unix milliseconds.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::revocations::Identity;
use crate::auth::{Destination, Grant, GrantId, GrantKind};

pub const GRANTS: &str = "grants/";
pub const REVOCATIONS: &str = "revocations/";

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// A source grant as the fleet stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub id: GrantId,
    pub source: IpAddr,
    pub subject: String,
    pub issuer: String,
    pub rule: String,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// The token's own `exp`: a revocation denies the token until then.
    pub token_expires_unix_ms: u64,
    pub destinations: Vec<Destination>,
    #[serde(default)]
    pub audit_claims: BTreeMap<String, Value>,
    #[serde(default)]
    pub jti: Option<String>,
    /// The bastion that issued it.
    pub bastion: String,
}

impl GrantRecord {
    /// The record of a source grant; `None` for a preamble grant (it lives
    /// and ends with its one connection, on its own bastion).
    #[must_use]
    pub fn of(grant: &Grant, bastion: &str) -> Option<Self> {
        Some(Self {
            id: grant.id,
            source: grant.source()?,
            subject: grant.subject.clone(),
            issuer: grant.issuer.clone(),
            rule: grant.rule.clone(),
            created_unix_ms: unix_ms(grant.created_at),
            expires_unix_ms: unix_ms(grant.expires_at),
            token_expires_unix_ms: unix_ms(grant.token_expires_at),
            destinations: grant.destinations.clone(),
            audit_claims: (*grant.audit_claims).clone(),
            jti: grant.jti.clone(),
            bastion: bastion.to_owned(),
        })
    }

    #[must_use]
    pub fn into_grant(self) -> Grant {
        Grant {
            id: self.id,
            kind: GrantKind::Source {
                source: self.source.to_canonical(),
            },
            subject: self.subject,
            issuer: self.issuer,
            rule: self.rule,
            created_at: from_unix_ms(self.created_unix_ms),
            expires_at: from_unix_ms(self.expires_unix_ms),
            destinations: self.destinations,
            audit_claims: self.audit_claims.into(),
            jti: self.jti,
            token_expires_at: from_unix_ms(self.token_expires_unix_ms),
        }
    }

    #[must_use]
    pub fn expires_at(&self) -> SystemTime {
        from_unix_ms(self.expires_unix_ms)
    }
}

/// One identity's deny entry in a subject revocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldRecord {
    /// Empty: every issuer (the subject had no token seen yet).
    pub issuer: String,
    pub until_unix_ms: u64,
}

/// A revocation, applied by every bastion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RevocationRecord {
    /// `tcpgate revoke --subject`: every grant of the subject ends, and its
    /// tokens are refused until each hold ends.
    Subject {
        subject: String,
        holds: Vec<HoldRecord>,
        /// When it was revoked: tokens issued later are not held past
        /// their identity's hold.
        revoked_unix_ms: u64,
        bastion: String,
    },
    /// One grant revoked: its token is refused until its `exp`.
    Token {
        grant: GrantId,
        issuer: String,
        jti: String,
        until_unix_ms: u64,
        bastion: String,
    },
}

impl RevocationRecord {
    #[must_use]
    pub fn subject(
        subject: &str,
        holds: &[(Identity, SystemTime)],
        revoked_at: SystemTime,
        bastion: &str,
    ) -> Self {
        Self::Subject {
            revoked_unix_ms: unix_ms(revoked_at),
            subject: subject.to_owned(),
            holds: holds
                .iter()
                .map(|((issuer, _), until)| HoldRecord {
                    issuer: issuer.clone(),
                    until_unix_ms: unix_ms(*until),
                })
                .collect(),
            bastion: bastion.to_owned(),
        }
    }

    /// The revocation of one grant's token; `None` when the token had no
    /// `jti` (then only the grant ends).
    #[must_use]
    pub fn token(grant: &Grant, bastion: &str) -> Option<Self> {
        Some(Self::Token {
            grant: grant.id,
            issuer: grant.issuer.clone(),
            jti: grant.jti.clone()?,
            until_unix_ms: unix_ms(grant.token_expires_at),
            bastion: bastion.to_owned(),
        })
    }

    /// Until when the record must live: the latest end it covers.
    #[must_use]
    pub fn until(&self) -> SystemTime {
        match self {
            Self::Subject { holds, .. } => {
                from_unix_ms(holds.iter().map(|h| h.until_unix_ms).max().unwrap_or(0))
            }
            Self::Token { until_unix_ms, .. } => from_unix_ms(*until_unix_ms),
        }
    }

    /// The holds of a subject revocation, as the deny list takes them.
    #[must_use]
    pub fn holds(subject: &str, holds: &[HoldRecord]) -> Vec<(Identity, SystemTime)> {
        holds
            .iter()
            .map(|h| {
                (
                    (h.issuer.clone(), subject.to_owned()),
                    from_unix_ms(h.until_unix_ms),
                )
            })
            .collect()
    }
}

/// A lease TTL (whole seconds, at least 1) lasting until `until`, rounded
/// up: etcd must never drop a record before the local clocks end it.
#[must_use]
pub fn ttl_until(until: SystemTime, now: SystemTime) -> i64 {
    let left = until.duration_since(now).unwrap_or(Duration::ZERO);
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            id: GrantId(0xabc),
            kind: GrantKind::Source {
                source: "198.51.100.2".parse().expect("ip"),
            },
            subject: "project_path:group/app:ref_type:branch:ref:main".into(),
            issuer: "https://gitlab.example".into(),
            rule: "deploy".into(),
            created_at: from_unix_ms(1_000_000),
            expires_at: from_unix_ms(1_600_000),
            destinations: vec![
                Destination::parse(&crate::auth::DestinationSpec {
                    prefix: "192.0.2.0/24".into(),
                    ports: vec!["5432".into()],
                })
                .expect("destination"),
            ],
            audit_claims: BTreeMap::from([("job_id".into(), Value::from(7))]).into(),
            jti: Some("j-1".into()),
            token_expires_at: from_unix_ms(3_600_000),
        }
    }

    #[test]
    fn a_grant_survives_the_round_trip_through_json() {
        let record = GrantRecord::of(&grant(), "bastion-a").expect("source grant");
        let text = serde_json::to_string(&record).expect("serializes");
        let back: GrantRecord = serde_json::from_str(&text).expect("parses");
        assert_eq!(back.bastion, "bastion-a");
        assert_eq!(back.into_grant(), grant());
        let mut preamble = grant();
        preamble.kind = GrantKind::Preamble;
        assert!(
            GrantRecord::of(&preamble, "a").is_none(),
            "preamble grants stay local"
        );
    }

    #[test]
    fn revocations_live_until_the_latest_end_they_cover() {
        let holds = [
            (("iss-a".to_owned(), "s".to_owned()), from_unix_ms(5_000)),
            (("iss-b".to_owned(), "s".to_owned()), from_unix_ms(9_000)),
        ];
        let record = RevocationRecord::subject("s", &holds, from_unix_ms(1_000), "b");
        assert_eq!(record.until(), from_unix_ms(9_000));
        let RevocationRecord::Subject { holds: h, .. } = &record else {
            panic!("subject record");
        };
        assert_eq!(RevocationRecord::holds("s", h), holds);
        let token = RevocationRecord::token(&grant(), "b").expect("has a jti");
        assert_eq!(token.until(), from_unix_ms(3_600_000));
        assert_eq!(ttl_until(from_unix_ms(3_500), from_unix_ms(1_000)), 3);
        assert_eq!(ttl_until(from_unix_ms(1_000), from_unix_ms(2_000)), 1);
    }
}
