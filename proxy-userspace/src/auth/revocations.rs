//! The deny list that makes revocation stick: a revoked token identity
//! (`iss`, `sub`), or one token by its `jti`, is refused until the latest
//! `exp` seen for it, so the same still-valid token cannot simply ask again.
//!
//! Held inside the grant store's lock: a grant is created only after the
//! list was checked under that same lock, so no grant slips in between a
//! revocation's deny entry and its removal of the identity's grants.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::token::ValidatedToken;

/// How long an identity stays denied when no token of it was ever seen
/// (its `exp` is unknown): long enough for a CI job's token to expire.
pub const UNSEEN_HOLD: Duration = Duration::from_secs(3600);

/// Entries kept before expired ones are swept out.
const SWEEP_AT: usize = 4096;

/// `(iss, sub)` of a token.
pub type Identity = (String, String);

/// The issuer of an identity denied under every issuer: a subject revoked
/// before any of its tokens was seen.
pub const ANY_ISSUER: &str = "";

#[derive(Debug, Clone, Copy)]
struct Hold {
    revoked_at: SystemTime,
    until: SystemTime,
}

/// Revoked identities and tokens, and the latest `exp` seen per identity.
#[derive(Debug, Default)]
pub struct Revocations {
    identities: HashMap<Identity, Hold>,
    /// `(iss, jti)` of single revoked tokens.
    tokens: HashMap<Identity, SystemTime>,
    /// Latest `exp` of any validated token per identity, so that a
    /// revocation lasts as long as the longest token it must stop.
    seen: HashMap<Identity, SystemTime>,
    /// Counts deny entries added: caches of verified tokens start over
    /// when it moves.
    epoch: u64,
}

fn identity(token: &ValidatedToken) -> Identity {
    (token.issuer.clone(), token.subject.clone())
}

fn jti(token: &ValidatedToken) -> Option<&str> {
    token.claims.get("jti").and_then(|v| v.as_str())
}

fn issued_at(token: &ValidatedToken) -> Option<SystemTime> {
    let iat = token.claims.get("iat")?.as_u64()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(iat))
}

impl Revocations {
    /// Notes a validated token's `exp`.
    pub fn saw(&mut self, token: &ValidatedToken, now: SystemTime) {
        if self.seen.len() >= SWEEP_AT {
            self.sweep(now);
        }
        let latest = self.seen.entry(identity(token)).or_insert(token.expires_at);
        *latest = (*latest).max(token.expires_at);
    }

    /// Whether `token` is refused. A token issued before its identity's
    /// revocation (or without `iat`) extends the hold to its own `exp`:
    /// an older token that outlives the first guess still never gets in.
    pub fn refuses(&mut self, token: &ValidatedToken, now: SystemTime) -> bool {
        if let Some(jti) = jti(token)
            && self
                .tokens
                .get(&(token.issuer.clone(), jti.to_owned()))
                .is_some_and(|until| *until > now)
        {
            return true;
        }
        let issued = issued_at(token);
        let exact = identity(token);
        let any_issuer = (ANY_ISSUER.to_owned(), token.subject.clone());
        let mut refused = false;
        for who in [exact, any_issuer] {
            if let Some(hold) = self.identities.get_mut(&who)
                && hold.until > now
            {
                if issued.is_none_or(|iat| iat <= hold.revoked_at) {
                    hold.until = hold.until.max(token.expires_at);
                }
                refused = true;
            }
        }
        refused
    }

    /// Denies `(issuer, subject)` until the latest `exp` seen for it (and
    /// at least until `at_least`).
    pub fn deny_identity(&mut self, who: Identity, at_least: SystemTime, now: SystemTime) {
        self.epoch += 1;
        let until = self
            .seen
            .get(&who)
            .copied()
            .unwrap_or(now + UNSEEN_HOLD)
            .max(at_least);
        let hold = self.identities.entry(who).or_insert(Hold {
            revoked_at: now,
            until,
        });
        hold.revoked_at = now;
        hold.until = hold.until.max(until);
    }

    /// Identities with this subject seen under any issuer.
    pub fn seen_with_subject(&self, subject: &str) -> Vec<Identity> {
        self.seen
            .keys()
            .filter(|(_, sub)| sub == subject)
            .cloned()
            .collect()
    }

    /// The identities of `subject` denied now, each with its hold's end.
    pub fn holds_with_subject(&self, subject: &str) -> Vec<(Identity, SystemTime)> {
        self.identities
            .iter()
            .filter(|((_, sub), _)| sub == subject)
            .map(|(who, hold)| (who.clone(), hold.until))
            .collect()
    }

    /// Denies one token by its `jti` until `until` (its `exp`).
    pub fn deny_token(&mut self, issuer: &str, jti: &str, until: SystemTime) {
        self.epoch += 1;
        let entry = self
            .tokens
            .entry((issuer.to_owned(), jti.to_owned()))
            .or_insert(until);
        *entry = (*entry).max(until);
    }

    /// How many deny entries were ever added (only grows).
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Drops every entry whose time has passed.
    pub fn sweep(&mut self, now: SystemTime) {
        self.identities.retain(|_, h| h.until > now);
        self.tokens.retain(|_, until| *until > now);
        self.seen.retain(|_, exp| *exp > now);
    }
}

/// The deny list, as handed to a successor agent on a takeover: without it
/// a token revoked before an upgrade would get a grant again after it.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RevocationSnapshot {
    /// `(issuer, subject)` held: revoked at, until.
    pub identities: Vec<(Identity, SystemTime, SystemTime)>,
    /// `(issuer, jti)` of single tokens denied, until.
    pub tokens: Vec<(Identity, SystemTime)>,
    /// The latest `exp` seen per identity (how long a later revocation holds).
    pub seen: Vec<(Identity, SystemTime)>,
}

impl Revocations {
    #[must_use]
    pub fn snapshot(&self) -> RevocationSnapshot {
        RevocationSnapshot {
            identities: self
                .identities
                .iter()
                .map(|(who, hold)| (who.clone(), hold.revoked_at, hold.until))
                .collect(),
            tokens: self
                .tokens
                .iter()
                .map(|(key, until)| (key.clone(), *until))
                .collect(),
            seen: self
                .seen
                .iter()
                .map(|(who, exp)| (who.clone(), *exp))
                .collect(),
        }
    }

    /// Merges a predecessor's deny list: every hold lasts at least as long
    /// as either agent had it.
    pub fn restore(&mut self, snapshot: &RevocationSnapshot) {
        for (who, revoked_at, until) in &snapshot.identities {
            let hold = self.identities.entry(who.clone()).or_insert(Hold {
                revoked_at: *revoked_at,
                until: *until,
            });
            hold.revoked_at = hold.revoked_at.max(*revoked_at);
            hold.until = hold.until.max(*until);
        }
        for ((issuer, jti), until) in &snapshot.tokens {
            self.deny_token(issuer, jti, *until);
        }
        for (who, exp) in &snapshot.seen {
            let latest = self.seen.entry(who.clone()).or_insert(*exp);
            *latest = (*latest).max(*exp);
        }
    }
}

/// The `jti` of a token, kept with its grant for a later revocation.
#[must_use]
pub fn token_jti(token: &ValidatedToken) -> Option<String> {
    jti(token).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn token(sub: &str, exp: u64, extra: &[(&str, serde_json::Value)]) -> ValidatedToken {
        let mut claims = serde_json::Map::new();
        for (k, v) in extra {
            claims.insert((*k).to_owned(), v.clone());
        }
        ValidatedToken {
            issuer: "https://gitlab.example".into(),
            subject: sub.into(),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
            claims,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_revoked_identity_is_refused_until_the_latest_exp_seen() {
        let mut r = Revocations::default();
        let old = token("job", 2_000, &[("iat", json!(900))]);
        r.saw(&old, at(1_000));
        r.saw(&token("job", 1_500, &[]), at(1_000));
        r.deny_identity(
            ("https://gitlab.example".into(), "job".into()),
            at(0),
            at(1_000),
        );
        assert!(r.refuses(&old, at(1_999)));
        assert!(
            !r.refuses(&old, at(2_000)),
            "the hold ends with the latest exp"
        );
        assert!(
            !r.refuses(&token("other", 2_000, &[]), at(1_100)),
            "another subject is untouched"
        );
    }

    /// "job" seen with exp 2000, revoked at 1000.
    fn job_denied_at_1000() -> Revocations {
        let mut r = Revocations::default();
        r.saw(&token("job", 2_000, &[]), at(1_000));
        r.deny_identity(
            ("https://gitlab.example".into(), "job".into()),
            at(0),
            at(1_000),
        );
        r
    }

    #[test]
    fn an_older_token_outliving_the_hold_extends_it_a_newer_one_does_not() {
        let mut r = job_denied_at_1000();
        let newer = token("job", 5_000, &[("iat", json!(1_200))]);
        assert!(r.refuses(&newer, at(1_300)));
        assert!(!r.refuses(&newer, at(2_000)), "issued after: not extended");
        let mut r = job_denied_at_1000();
        let older = token("job", 3_000, &[("iat", json!(500))]);
        assert!(r.refuses(&older, at(1_300)));
        assert!(
            r.refuses(&older, at(2_500)),
            "issued before: held to its exp"
        );
    }

    #[test]
    fn unseen_identities_are_held_for_a_while_and_jtis_alone() {
        let mut r = Revocations::default();
        r.deny_identity(
            ("https://gitlab.example".into(), "ghost".into()),
            at(0),
            at(1_000),
        );
        let ghost = token("ghost", 99_999, &[("iat", json!(1_500))]);
        assert!(r.refuses(&ghost, at(1_000 + UNSEEN_HOLD.as_secs() - 1)));
        assert!(!r.refuses(&ghost, at(1_000 + UNSEEN_HOLD.as_secs())));
        let mut r = Revocations::default();
        r.deny_identity((ANY_ISSUER.into(), "ghost".into()), at(0), at(1_000));
        assert!(r.refuses(&ghost, at(1_500)), "any issuer");
        r.deny_token("https://gitlab.example", "abc", at(3_000));
        assert!(r.refuses(&token("x", 3_000, &[("jti", json!("abc"))]), at(2_000)));
        assert!(!r.refuses(&token("x", 3_000, &[("jti", json!("abd"))]), at(2_000)));
        r.sweep(at(1_000_000));
        assert!(r.identities.is_empty() && r.tokens.is_empty());
    }

    #[test]
    fn a_restored_snapshot_refuses_what_the_original_refused() {
        let now = SystemTime::now();
        let mut original = Revocations::default();
        let old = token("alice", 4_000_000_000, &[("jti", json!("j1"))]);
        original.saw(&old, now);
        let issuer = "https://gitlab.example";
        original.deny_identity((issuer.to_owned(), "alice".to_owned()), now, now);
        original.deny_token(issuer, "j2", now + Duration::from_secs(3600));
        let wire = serde_json::to_string(&original.snapshot()).expect("serialise");
        let snapshot: RevocationSnapshot = serde_json::from_str(&wire).expect("parse");
        let mut successor = Revocations::default();
        successor.restore(&snapshot);
        assert!(successor.refuses(&old, now));
        let other = token("bob", 4_000_000_000, &[("jti", json!("j2"))]);
        assert!(successor.refuses(&other, now));
        let fresh = token("bob", 4_000_000_000, &[("jti", json!("j3"))]);
        assert!(!successor.refuses(&fresh, now));
        assert_eq!(successor.snapshot().identities, snapshot.identities);
    }
}
