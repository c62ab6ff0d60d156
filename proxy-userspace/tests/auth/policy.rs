//! Policy decisions on GitLab-shaped tokens.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Value, json};
use tcpgate::auth::{
    AuthConfig, Denial, Destination, DestinationSpec, Policy, RuleConfig, ValidatedToken,
};

use crate::support::*;

#[derive(Deserialize)]
pub(crate) struct Sections {
    pub(crate) auth: AuthConfig,
    #[serde(default)]
    pub(crate) policy: Vec<RuleConfig>,
}

pub(crate) const AUTH: &str = r#"
[auth]
[[auth.issuer]]
issuer = "https://gitlab.example.com"
audience = "tcpgate"
jwks_file = "/nonexistent/jwks.json"
[[auth.issuer]]
issuer = "https://other.example.com"
audience = "tcpgate"
jwks_file = "/nonexistent/other.json"
"#;

pub(crate) fn policy(rules: &str) -> Policy {
    let s: Sections = toml::from_str(&format!("{AUTH}\n{rules}")).expect("config parses");
    Policy::from_config(&s.policy, &s.auth).unwrap_or_else(|e| panic!("policy invalid: {e:?}"))
}

pub(crate) fn token(claims: Value) -> ValidatedToken {
    let claims = claims.as_object().expect("object").clone();
    let exp = claims["exp"].as_u64().expect("exp");
    ValidatedToken {
        issuer: claims["iss"].as_str().expect("iss").to_owned(),
        subject: claims["sub"].as_str().expect("sub").to_owned(),
        expires_at: UNIX_EPOCH + Duration::from_secs(exp),
        claims,
    }
}

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn dest(prefix: &str, ports: &[&str]) -> Destination {
    Destination::parse(&DestinationSpec {
        prefix: prefix.into(),
        ports: ports.iter().map(|p| p.to_string()).collect(),
    })
    .expect("destination")
}

pub(crate) const DEPLOY: &str = r#"
[[policy]]
name = "deploy-db"
issuer = "https://gitlab.example.com"
max_lifetime = "15m"
match = { project_path = "group/app", ref_protected = true, ref = "release/*", ref_type = ["branch", "tag"] }
allow = [ { prefix = "192.0.2.0/24", ports = ["5432"] }, { prefix = "2001:db8::/64", ports = ["22", "8000-8099"] } ]
"#;

#[test]
fn gitlab_token_matches_exact_glob_list_and_string_boolean() {
    let p = policy(DEPLOY);
    let now = SystemTime::now();
    let t = token(gitlab_claims());
    let d = p.decide(&t, addr("192.0.2.10:5432"), now).expect("allowed");
    assert_eq!(d.rule, "deploy-db");
    assert_eq!(d.destinations.len(), 2);
    assert!(p.decide(&t, addr("[2001:db8::7]:8042"), now).is_ok());
    assert!(
        p.decide(&t, addr("[::ffff:192.0.2.10]:5432"), now).is_ok(),
        "v4-mapped destination"
    );
    // JSON true satisfies the boolean matcher like GitLab's "true" does.
    assert!(
        p.decide(
            &token(claims_with(&[("ref_protected", json!(true))])),
            addr("192.0.2.1:5432"),
            now
        )
        .is_ok()
    );
    for (claim, value) in [
        ("ref_protected", json!("false")),
        ("ref_protected", json!(false)),
        ("ref", json!("main")),
        ("ref_type", json!("merge_request")),
        ("project_path", json!("group/app-fork")),
    ] {
        let t = token(claims_with(&[(claim, value.clone())]));
        assert_eq!(
            p.decide(&t, addr("192.0.2.10:5432"), now),
            Err(Denial::NoRuleMatched),
            "{claim}={value}"
        );
    }
}

#[test]
fn a_missing_claim_never_matches() {
    let p = policy(
        r#"[[policy]]
        name = "any-env"
        issuer = "https://gitlab.example.com"
        max_lifetime = "5m"
        match = { environment = "*" }
        allow = [ { prefix = "192.0.2.0/24", ports = ["1-65535"] } ]"#,
    );
    let now = SystemTime::now();
    assert!(
        p.decide(&token(gitlab_claims()), addr("192.0.2.1:80"), now)
            .is_ok()
    );
    let no_env = token(claims_with(&[("environment", Value::Null)]));
    assert_eq!(
        p.decide(&no_env, addr("192.0.2.1:80"), now),
        Err(Denial::NoRuleMatched)
    );
}

#[test]
fn deny_by_default_and_reasons() {
    let now = SystemTime::now();
    let t = token(gitlab_claims());
    let e = policy("")
        .decide(&t, addr("192.0.2.10:5432"), now)
        .expect_err("empty policy denies");
    assert_eq!(e.reason(), "no_rule_matched");
    let p = policy(DEPLOY);
    let e = p
        .decide(&t, addr("192.0.2.10:5433"), now)
        .expect_err("port not allowed");
    assert_eq!(e.reason(), "destination_not_allowed");
    assert!(e.to_string().contains("deploy-db"), "{e}");
    assert_eq!(
        p.decide(&t, addr("198.51.100.1:5432"), now)
            .err()
            .map(|e| e.reason()),
        Some("destination_not_allowed")
    );
}

#[test]
fn first_matching_rule_wins_and_issuer_restricts() {
    let p = policy(
        r#"[[policy]]
        name = "other-issuer"
        issuer = "https://other.example.com"
        max_lifetime = "1h"
        allow = [ { prefix = "192.0.2.0/24", ports = ["5432"] } ]
        [[policy]]
        name = "short"
        issuer = "https://gitlab.example.com"
        max_lifetime = "1m"
        match = { project_path = "group/*" }
        allow = [ { prefix = "192.0.2.0/24", ports = ["5432"] } ]
        [[policy]]
        name = "long"
        issuer = "https://gitlab.example.com"
        max_lifetime = "10m"
        match = { project_path = "group/app" }
        allow = [ { prefix = "192.0.2.0/24", ports = ["5432"] }, { prefix = "198.51.100.7", ports = ["22"] } ]"#,
    );
    let now = SystemTime::now();
    let t = token(gitlab_claims());
    let d = p.decide(&t, addr("192.0.2.9:5432"), now).expect("allowed");
    assert_eq!(d.rule, "short");
    assert_eq!(d.expires_at, now + Duration::from_secs(60));
    // "short" does not allow 198.51.100.7:22; the next applicable rule does.
    assert_eq!(
        p.decide(&t, addr("198.51.100.7:22"), now)
            .expect("allowed")
            .rule,
        "long"
    );
    let other = token(claims_with(&[
        ("iss", json!("https://other.example.com")),
        ("project_path", json!("x/y")),
    ]));
    assert_eq!(
        p.decide(&other, addr("192.0.2.9:5432"), now)
            .expect("allowed")
            .rule,
        "other-issuer"
    );
}

#[test]
fn lifetime_is_the_minimum_of_token_and_rule() {
    let p = policy(DEPLOY);
    let now = SystemTime::now();
    let t = token(gitlab_claims()); // exp in 5 minutes, rule allows 15
    assert_eq!(
        p.decide(&t, addr("192.0.2.10:5432"), now)
            .expect("ok")
            .expires_at,
        t.expires_at
    );
    let long = token(claims_with(&[("exp", json!(unix_now() + 7200))]));
    let d = p.decide(&long, addr("192.0.2.10:5432"), now).expect("ok");
    assert_eq!(d.expires_at, now + Duration::from_secs(15 * 60));
}

#[test]
fn grants_may_only_narrow() {
    let p = policy(DEPLOY);
    let now = SystemTime::now();
    let t = token(claims_with(&[("exp", json!(unix_now() + 7200))]));
    let whole = p.decide_grant(&t, None, None, now).expect("whole rule");
    assert_eq!(whole.destinations.len(), 2);
    assert_eq!(whole.expires_at, now + Duration::from_secs(900));
    let narrow = vec![
        dest("192.0.2.10", &["5432"]),
        dest("2001:db8::/80", &["8000-8010"]),
    ];
    let d = p
        .decide_grant(
            &t,
            Some(narrow.clone()),
            Some(Duration::from_secs(120)),
            now,
        )
        .expect("narrowed");
    assert_eq!(
        (d.destinations, d.expires_at),
        (narrow, now + Duration::from_secs(120))
    );
    // A requested lifetime longer than the rule's is cut to the rule's.
    let d = p
        .decide_grant(&t, None, Some(Duration::from_secs(86400)), now)
        .expect("capped");
    assert_eq!(d.expires_at, now + Duration::from_secs(900));
    for wider in [
        dest("192.0.2.0/23", &["5432"]),
        dest("192.0.2.10", &["5432-5433"]),
        dest("2001:db8::/63", &["22"]),
    ] {
        let e = p.decide_grant(
            &t,
            Some(vec![dest("192.0.2.10", &["5432"]), wider.clone()]),
            None,
            now,
        );
        assert_eq!(
            e.err().map(|e| e.reason()),
            Some("destination_not_allowed"),
            "{wider}"
        );
    }
    let stranger = token(claims_with(&[("project_path", json!("x/y"))]));
    assert_eq!(
        p.decide_grant(&stranger, None, None, now).err(),
        Some(Denial::NoRuleMatched)
    );
}

#[test]
fn rule_destinations_must_lie_inside_the_intercepted_set() {
    let p = policy(DEPLOY);
    let intercepted = vec![
        dest("192.0.2.0/24", &["1-65535"]),
        dest("2001:db8::/48", &["22", "8000-8049"]),
    ];
    let errors: Vec<String> = p
        .check_within(&intercepted)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("policy[0] (deploy-db).allow[1]: 2001:db8::/64"),
        "{errors:?}"
    );
    let covering = vec![
        intercepted[0].clone(),
        dest("2001:db8::/48", &["22", "8000-8099"]),
    ];
    assert!(p.check_within(&covering).is_empty());
}
