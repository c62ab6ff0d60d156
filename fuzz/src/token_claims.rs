//! `token_claims`: tokens through the full validation path, and claims
//! through the policy, against the fixed world of [`crate::fixture`].
//!
//! The first byte picks what the rest of the input is:
//!
//! - `{`: a JSON claim set (the whole input), decided by the policy as if
//!   a token had carried it;
//! - `#`: header, payload and signature separated by `0xff` bytes; the
//!   harness base64url-encodes each part, so the JSON parsing behind the
//!   base64 is fuzzed directly;
//! - `*`: a glob pattern and a value separated by a `0xff` byte, matched by
//!   the policy's text matcher and by a plain reference matcher;
//! - anything else: the whole input is the token string.
//!
//! Every accepted token and every claim set is also decided by the policy,
//! and each decision is checked against a reference reading of the rules
//! (the matcher semantics documented in `tcpgate::auth::matcher`).

use std::time::{Duration, SystemTime};

use base64_url::encode as b64;
use serde_json::{Map, Value};
use tcpgate::auth::destination::set_contains;
use tcpgate::auth::matcher::{Matcher, TextMatcher};
use tcpgate::auth::policy::Rule;
use tcpgate::auth::{Denial, ValidatedToken};

use crate::fixture::{DEV_ISSUER, GITLAB_ISSUER, WORLD, decision_time, probe_destinations};

const SEPARATOR: u8 = 0xff;

pub fn check(data: &[u8]) -> String {
    match data.first() {
        Some(b'{') => check_claims(data),
        Some(b'#') => {
            let mut parts = data[1..].splitn(3, |&b| b == SEPARATOR);
            let mut next = || b64(parts.next().unwrap_or_default());
            let token = format!("{}.{}.{}", next(), next(), next());
            check_token(&token)
        }
        Some(b'*') => {
            let mut parts = data[1..].splitn(2, |&b| b == SEPARATOR);
            let pattern = parts.next().unwrap_or_default();
            let value = parts.next().unwrap_or_default();
            match (std::str::from_utf8(pattern), std::str::from_utf8(value)) {
                (Ok(p), Ok(v)) => check_glob(p, v),
                _ => "glob: not UTF-8".to_owned(),
            }
        }
        _ => match std::str::from_utf8(data) {
            Ok(token) => check_token(token),
            Err(_) => "token: not UTF-8".to_owned(),
        },
    }
}

fn check_token(token: &str) -> String {
    let world = &*WORLD;
    match world.runtime.block_on(world.validator.validate(token)) {
        Ok(valid) => {
            assert!(
                valid.issuer == GITLAB_ISSUER || valid.issuer == DEV_ISSUER,
                "accepted a token of issuer {:?}",
                valid.issuer
            );
            assert_eq!(
                valid.claims.get("iss"),
                Some(&Value::from(valid.issuer.clone()))
            );
            assert!(!valid.subject.is_empty());
            format!("token: valid ({}); {}", valid.issuer, check_policy(&valid))
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            format!("token: rejected ({})", e.reason())
        }
    }
}

/// Decides a claim set as if a valid token had carried it.
fn check_claims(data: &[u8]) -> String {
    let Ok(claims) = serde_json::from_slice::<Map<String, Value>>(data) else {
        return "claims: not a JSON object".to_owned();
    };
    let issuer = match claims.get("iss") {
        Some(Value::String(s)) => s.clone(),
        _ => GITLAB_ISSUER.to_owned(),
    };
    let expires_at = claims
        .get("exp")
        .and_then(Value::as_u64)
        .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .unwrap_or(decision_time() + Duration::from_secs(3600));
    let token = ValidatedToken {
        issuer,
        subject: "fuzz".to_owned(),
        expires_at,
        claims,
    };
    format!("claims: {}", check_policy(&token))
}

/// Decides `token` for every probe destination and for a whole-rule grant,
/// and checks each decision against [`reference_applies`].
fn check_policy(token: &ValidatedToken) -> String {
    let policy = &WORLD.policy;
    let now = decision_time();
    let applying: Vec<&Rule> = policy
        .rules()
        .iter()
        .filter(|rule| {
            let applies = rule.applies_to(token);
            assert_eq!(
                applies,
                reference_applies(rule, token),
                "rule {} disagrees with the reference reading",
                rule.name
            );
            applies
        })
        .collect();
    let names: Vec<String> = applying.iter().map(|r| r.name.clone()).collect();
    for dest in probe_destinations() {
        match policy.decide(token, dest, now) {
            Ok(decision) => {
                let first = applying
                    .iter()
                    .find(|r| set_contains(&r.allow, dest))
                    .expect("an allowed destination has an applying rule that allows it");
                assert_eq!(decision.rule, first.name, "the first allowing rule wins");
                assert_eq!(decision.destinations, first.allow);
                check_expiry(decision.expires_at, token, first, now);
            }
            Err(Denial::NoRuleMatched) => assert!(applying.is_empty()),
            Err(Denial::DestinationNotAllowed { destination, rules }) => {
                assert_eq!(destination, dest.to_string());
                assert_eq!(rules, names);
                assert!(applying.iter().all(|r| !set_contains(&r.allow, dest)));
            }
        }
    }
    match policy.decide_grant(token, None, None, now) {
        Ok(decision) => {
            let first = applying.first().expect("a grant needs an applying rule");
            assert_eq!(decision.rule, first.name);
            assert_eq!(decision.destinations, first.allow);
            check_expiry(decision.expires_at, token, first, now);
        }
        Err(denial) => {
            assert_eq!(denial, Denial::NoRuleMatched);
            assert!(applying.is_empty());
        }
    }
    format!("rules [{}]", names.join(", "))
}

fn check_expiry(expires_at: SystemTime, token: &ValidatedToken, rule: &Rule, now: SystemTime) {
    assert!(expires_at <= token.expires_at, "a grant outlives its token");
    if let Some(limit) = now.checked_add(rule.max_lifetime) {
        assert!(
            expires_at <= limit,
            "a grant outlives its rule's max_lifetime"
        );
    }
}

/// The rule semantics as documented, written independently of the matcher.
pub fn reference_applies(rule: &Rule, token: &ValidatedToken) -> bool {
    rule.issuer == token.issuer
        && rule.claims.iter().all(|(claim, m)| {
            let segments: Vec<&str> = claim.split('.').collect();
            reference_matches(m, reference_lookup(&token.claims, &segments))
        })
}

/// A claim path, longest key first at each level, without backtracking.
fn reference_lookup<'a>(claims: &'a Map<String, Value>, segments: &[&str]) -> Option<&'a Value> {
    (1..=segments.len()).rev().find_map(|n| {
        let value = claims.get(&segments[..n].join("."))?;
        Some(if n == segments.len() {
            Some(value)
        } else {
            value
                .as_object()
                .and_then(|inner| reference_lookup(inner, &segments[n..]))
        })
    })?
}

fn reference_matches(m: &Matcher, claim: Option<&Value>) -> bool {
    let Some(value) = claim else { return false };
    match m {
        Matcher::Bool(want) => match value {
            Value::Bool(b) => b == want,
            Value::String(s) => *s == want.to_string(),
            _ => false,
        },
        Matcher::Integer(want) => match value {
            Value::Number(n) => n.as_i64() == Some(*want),
            // "its decimal string": exactly what GitLab sends for an id.
            Value::String(s) => *s == want.to_string(),
            _ => false,
        },
        Matcher::Text(t) => text_of(value).is_some_and(|s| reference_text(t, &s)),
        Matcher::AnyOf(ts) => {
            text_of(value).is_some_and(|s| ts.iter().any(|t| reference_text(t, &s)))
        }
        Matcher::AnyElement(inner) => match value {
            Value::Array(items) => items.iter().any(|v| reference_matches(inner, Some(v))),
            one => reference_matches(inner, Some(one)),
        },
    }
}

fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn reference_text(t: &TextMatcher, value: &str) -> bool {
    match t {
        TextMatcher::Exact(s) => s == value,
        TextMatcher::Glob { pattern, .. } => wildcard(pattern, value),
    }
}

fn check_glob(pattern: &str, value: &str) -> String {
    // Every string is a valid pattern (`TextMatcher::new` cannot fail):
    // only `*` and `?` are special.
    let matcher = TextMatcher::new(pattern);
    let got = matcher.matches(value);
    assert_eq!(
        got,
        wildcard(pattern, value),
        "pattern {pattern:?} on {value:?}"
    );
    format!("glob: {}", if got { "match" } else { "no match" })
}

/// `*` matches any run of characters (including `/` and none), `?` exactly
/// one character; everything else matches itself. A dynamic program over
/// (pattern suffix, text suffix), unlike the matcher under test.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // row[j]: does p[i..] match t[j..]? Starts at i = p.len().
    let mut row: Vec<bool> = (0..=t.len()).map(|j| j == t.len()).collect();
    for &c in p.iter().rev() {
        let mut next = vec![false; t.len() + 1];
        for j in (0..=t.len()).rev() {
            next[j] = match c {
                '*' => row[j] || (j < t.len() && next[j + 1]),
                '?' => j < t.len() && row[j + 1],
                lit => j < t.len() && t[j] == lit && row[j + 1],
            };
        }
        row = next;
    }
    row[0]
}

/// base64url without padding, as JWTs use it.
mod base64_url {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    pub fn encode(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }
}
