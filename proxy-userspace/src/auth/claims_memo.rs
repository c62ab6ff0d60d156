//! A verified token with what grants derive from it, computed once per
//! token and shared (`Arc`) by every grant and session it admits.
//!
//! A CI job opens many connections with one token: each used to get its
//! own copy of the configured audit claims (a `BTreeMap` of strings, about
//! 600 bytes per live session with GitLab's claims). The memo lives inside
//! the verified token itself, which the verified-token cache keys by the
//! token's SHA-256, so a memoized value can only ever be reached through
//! the very token it was computed from: another token (another subject, or
//! the same subject with other claims) has its own entry and its own memo.
//! A cache clear (revocation, key change) drops the memo with the entry.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use super::token::ValidatedToken;
use crate::audit::AuditClaims;

/// A verified token and its memoized derived values.
#[derive(Debug)]
pub struct Verified {
    token: ValidatedToken,
    audit_claims: OnceLock<AuditClaims>,
}

impl Verified {
    #[must_use]
    pub fn new(token: ValidatedToken) -> Arc<Self> {
        Arc::new(Self {
            token,
            audit_claims: OnceLock::new(),
        })
    }

    /// The token's audit claims: `compute` runs on the first call only.
    /// The grant store is the only caller and its list of audit claims is
    /// fixed for the agent's life, so the memo cannot go stale.
    pub fn audit_claims(
        &self,
        compute: impl FnOnce(&ValidatedToken) -> BTreeMap<String, Value>,
    ) -> AuditClaims {
        self.audit_claims
            .get_or_init(|| AuditClaims::new(compute(&self.token)))
            .clone()
    }
}

impl Deref for Verified {
    type Target = ValidatedToken;

    fn deref(&self) -> &ValidatedToken {
        &self.token
    }
}

impl PartialEq for Verified {
    /// The same token; the memo is derived from it.
    fn eq(&self, other: &Self) -> bool {
        self.token == other.token
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use serde_json::{Map, json};

    use super::*;

    fn verified(subject: &str, project: &str) -> Arc<Verified> {
        let mut claims = Map::new();
        claims.insert("sub".into(), json!(subject));
        claims.insert("project_path".into(), json!(project));
        Verified::new(ValidatedToken {
            issuer: "https://gitlab.example".into(),
            subject: subject.into(),
            expires_at: SystemTime::UNIX_EPOCH,
            claims,
        })
    }

    fn project_of(token: &ValidatedToken) -> BTreeMap<String, Value> {
        BTreeMap::from([(
            "project_path".to_owned(),
            token.claims["project_path"].clone(),
        )])
    }

    #[test]
    fn computed_once_and_shared_by_every_caller() {
        let token = verified("job", "group/app");
        let mut calls = 0;
        let first = token.audit_claims(|t| {
            calls += 1;
            project_of(t)
        });
        let second = token.audit_claims(|_| unreachable!("memoized"));
        assert_eq!(calls, 1);
        assert!(first.ptr_eq(&second), "one copy for all sessions");
        assert_eq!(first["project_path"], json!("group/app"));
    }

    #[test]
    fn another_token_never_gets_the_memo_of_the_first() {
        let mine = verified("job-a", "group/a");
        let theirs = verified("job-b", "group/b");
        let a = mine.audit_claims(project_of);
        let b = theirs.audit_claims(project_of);
        assert!(!a.ptr_eq(&b));
        assert_eq!(b["project_path"], json!("group/b"));
        assert_eq!(theirs.subject, "job-b");
    }
}
