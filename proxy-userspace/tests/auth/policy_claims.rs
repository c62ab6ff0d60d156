//! Policy on claims by path (nested objects, arrays by contains), the
//! explanation of a decision, and matcher errors that name their field.

use std::time::SystemTime;

use serde_json::{Value, json};
use tcpgate::auth::{Denial, Policy};

use crate::policy::{AUTH, DEPLOY, Sections, addr, policy, token};
use crate::support::*;

const NESTED: &str = r#"
[[policy]]
name = "k8s-ci"
issuer = "https://gitlab.example.com"
max_lifetime = "5m"
match = { "kubernetes.io.namespace" = "ci", "kubernetes.io.serviceaccount.name" = "deploy-*", groups = { contains = "deployers" }, aud = { contains = "tcpgate" } }
allow = [ { prefix = "192.0.2.0/24", ports = ["5432"] } ]
"#;

fn nested_claims(namespace: &str, groups: Value, aud: Value) -> Value {
    claims_with(&[
        (
            "kubernetes.io",
            json!({ "namespace": namespace, "serviceaccount": { "name": "deploy-bot", "uid": "9f2c" } }),
        ),
        ("groups", groups),
        ("aud", aud),
    ])
}

#[test]
fn nested_claims_by_path_and_array_elements_by_contains() {
    let p = policy(NESTED);
    let now = SystemTime::now();
    let at = addr("192.0.2.10:5432");
    let ok = token(nested_claims(
        "ci",
        json!(["devs", "deployers"]),
        json!(["tcpgate", "other"]),
    ));
    assert_eq!(p.decide(&ok, at, now).expect("allowed").rule, "k8s-ci");
    // `aud` as a single string is a one-element array.
    let single = token(nested_claims("ci", json!(["deployers"]), json!("tcpgate")));
    assert!(p.decide(&single, at, now).is_ok());
    for (why, claims) in [
        (
            "namespace",
            nested_claims("prod", json!(["deployers"]), json!("tcpgate")),
        ),
        (
            "groups element",
            nested_claims("ci", json!(["devs"]), json!("tcpgate")),
        ),
        (
            "groups scalar",
            nested_claims("ci", json!("devs"), json!("tcpgate")),
        ),
        (
            "aud",
            nested_claims("ci", json!(["deployers"]), json!(["other"])),
        ),
        // The same names at the top level are not the nested claims.
        (
            "flattened",
            claims_with(&[("namespace", json!("ci")), ("groups", json!(["deployers"]))]),
        ),
    ] {
        let t = token(claims);
        assert_eq!(p.decide(&t, at, now), Err(Denial::NoRuleMatched), "{why}");
    }
}

#[test]
fn explain_reports_every_matcher_of_every_rule_tried() {
    use tcpgate::auth::explain::RuleOutcome;
    let p = policy(&format!("{NESTED}\n{DEPLOY}"));
    let now = SystemTime::now();
    let t = token(gitlab_claims());
    let e = p.explain(&t, Some(addr("192.0.2.10:5432")), now);
    assert_eq!(e.result, p.decide(&t, addr("192.0.2.10:5432"), now));
    assert_eq!(e.rules.len(), 2);
    let k8s = &e.rules[0];
    assert_eq!(k8s.outcome, RuleOutcome::NotApplicable);
    // Every matcher is reported, not only the first miss.
    assert_eq!(k8s.check.claims.len(), 4);
    let ns = k8s
        .check
        .claims
        .iter()
        .find(|c| c.claim == "kubernetes.io.namespace")
        .expect("namespace check");
    assert!(!ns.matched && ns.actual.is_none());
    assert_eq!(ns.hint(), Some("the token has no such claim"));
    let aud = k8s
        .check
        .claims
        .iter()
        .find(|c| c.claim == "aud")
        .expect("aud");
    assert!(aud.matched, "GitLab's single aud string satisfies contains");
    assert_eq!(e.rules[1].outcome, RuleOutcome::Allowed);
    assert!(e.rules[1].check.claims.iter().all(|c| c.matched));
    // Another port: the applicable rule is reported as not covering it.
    let e = p.explain(&t, Some(addr("192.0.2.10:22")), now);
    assert_eq!(e.rules[1].outcome, RuleOutcome::DestinationNotAllowed);
    assert_eq!(
        e.result.err().map(|d| d.reason()),
        Some("destination_not_allowed")
    );
    // Without a destination: the grant the first applicable rule gives.
    let e = p.explain(&t, None, now);
    assert_eq!(e.result.expect("grant").destinations.len(), 2);
}

#[test]
fn bad_matchers_and_paths_name_the_field() {
    let s: Sections = toml::from_str(&format!(
        "{AUTH}\n{}",
        r#"[[policy]]
        name = "bad"
        issuer = "https://gitlab.example.com"
        max_lifetime = "5m"
        match.kubernetes.io.namespace = "ci"
        match."a..b" = "x"
        match."kubernetes.io.pod.name" = { glob = "x", equals = "y" }
        match.groups = { contains = [] }
        allow = [ { prefix = "192.0.2.0/24", ports = ["5432"] } ]"#
    ))
    .expect("config parses");
    let errors: Vec<String> = Policy::from_config(&s.policy, &s.auth)
        .expect_err("invalid")
        .iter()
        .map(ToString::to_string)
        .collect();
    let has = |needle: &str| errors.iter().any(|e| e.contains(needle));
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(
        has("policy[0] (bad).match.kubernetes: `io` is not a matcher operator"),
        "{errors:#?}"
    );
    assert!(has("\"kubernetes.io.namespace\" = \"ci\""), "{errors:#?}");
    assert!(
        has("policy[0] (bad).match: claim path `a..b` has an empty segment"),
        "{errors:#?}"
    );
    assert!(
        has("policy[0] (bad).match.\"kubernetes.io.pod.name\": a matcher table needs exactly one"),
        "{errors:#?}"
    );
    assert!(
        has("policy[0] (bad).match.groups: in `contains`"),
        "{errors:#?}"
    );
}
