//! `tcpgate policy explain`: each outcome, its exit status, and a report
//! that names the claim, what was expected and what the token has.

use serde_json::{Value, json};

use crate::support::*;

const POLICY: &str = r#"
[[policy]]
name = "k8s-ci"
issuer = "https://gitlab.example.com"
max_lifetime = "5m"
match = { "kubernetes.io.namespace" = "ci" }
allow = [ { prefix = "192.0.2.0/24", ports = ["22"] } ]

[[policy]]
name = "deploy"
issuer = "https://gitlab.example.com"
max_lifetime = "15m"
match = { project_path = "group/app", ref = "release/*" }
allow = [ { prefix = "192.0.2.10", ports = ["5432"] } ]
"#;

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("JSON report: {e}: {stdout}"))
}

#[test]
fn allowed_shows_rules_tried_claims_and_the_grant() {
    let b = Bastion::new(POLICY);
    let token = b.token_file("ok.jwt", &b.key.sign(&gitlab_claims()));
    let (status, stdout, stderr) = b.explain(&token, &["--dest", "192.0.2.10:5432"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("result   ALLOWED by rule deploy"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"project_path\": \"group/app\""),
        "claims shown: {stdout}"
    );
    assert!(
        stdout.contains("MISS kubernetes.io.namespace"),
        "the first rule's miss is shown: {stdout}"
    );
    let (status, stdout, _) = b.explain(&token, &["--dest", "192.0.2.10:5432", "--json"]);
    assert_eq!(status, 0);
    let r = json_of(&stdout);
    assert_eq!(r["decision"]["allowed"], json!(true));
    assert_eq!(r["decision"]["rule"], json!("deploy"));
    assert_eq!(
        r["decision"]["destinations"],
        json!(["192.0.2.10/32 port 5432"])
    );
    assert_eq!(r["rules"][0]["outcome"], json!("not_applicable"));
    assert_eq!(
        r["rules"][0]["claims"][0]["claim"],
        json!("kubernetes.io.namespace")
    );
    assert_eq!(r["rules"][0]["claims"][0]["actual"], Value::Null);
    assert_eq!(r["rules"][1]["outcome"], json!("allowed"));
    assert_eq!(r["token"]["claims"]["ref"], json!("release/1.4"));
    // The token lives 5 minutes, the rule allows 15: the token's end wins.
    let lifetime = r["decision"]["lifetime_secs"].as_u64().expect("lifetime");
    assert!((250..=300).contains(&lifetime), "{lifetime}");
}

#[test]
fn denied_by_a_claim_names_claim_expected_and_actual() {
    let b = Bastion::new(POLICY);
    let token = b.token_file(
        "main.jwt",
        &b.key.sign(&claims_with(&[("ref", json!("main"))])),
    );
    let (status, stdout, _) = b.explain(&token, &["--dest", "192.0.2.10:5432", "--json"]);
    assert_eq!(status, 77, "{stdout}");
    let r = json_of(&stdout);
    assert_eq!(r["decision"]["allowed"], json!(false));
    assert_eq!(r["decision"]["denial"]["reason"], json!("no_rule_matched"));
    let refcheck = r["rules"][1]["claims"]
        .as_array()
        .expect("claims")
        .iter()
        .find(|c| c["claim"] == json!("ref"))
        .expect("ref check")
        .clone();
    assert_eq!(refcheck["expected"], json!("glob \"release/*\""));
    assert_eq!(refcheck["actual"], json!("main"));
    assert_eq!(refcheck["matched"], json!(false));
    let (status, stdout, _) = b.explain(&token, &["--dest", "192.0.2.10:5432"]);
    assert_eq!(status, 77);
    assert!(
        stdout.contains("result   DENIED (no_rule_matched)"),
        "{stdout}"
    );
}

#[test]
fn a_destination_outside_the_rule_is_denied_and_without_dest_the_grant_is_shown() {
    let b = Bastion::new(POLICY);
    let token = b.token_file("ok.jwt", &b.key.sign(&gitlab_claims()));
    let (status, stdout, _) = b.explain(&token, &["--dest", "192.0.2.10:22", "--json"]);
    assert_eq!(status, 77, "{stdout}");
    let r = json_of(&stdout);
    assert_eq!(
        r["decision"]["denial"]["reason"],
        json!("destination_not_allowed")
    );
    assert_eq!(r["rules"][1]["outcome"], json!("destination_not_allowed"));
    let (status, stdout, _) = b.explain(&token, &["--json"]);
    assert_eq!(status, 0, "{stdout}");
    let r = json_of(&stdout);
    assert_eq!(r["dest"], Value::Null);
    assert_eq!(r["decision"]["rule"], json!("deploy"));
}

#[test]
fn nested_claims_admit_by_path() {
    let b = Bastion::new(POLICY);
    let claims = claims_with(&[("kubernetes.io", json!({ "namespace": "ci" }))]);
    let token = b.token_file("k8s.jwt", &b.key.sign(&claims));
    let (status, stdout, _) = b.explain(&token, &["--dest", "192.0.2.99:22", "--json"]);
    assert_eq!(status, 0, "{stdout}");
    let r = json_of(&stdout);
    assert_eq!(r["decision"]["rule"], json!("k8s-ci"));
    assert_eq!(r["rules"][0]["claims"][0]["actual"], json!("ci"));
    assert_eq!(
        r["rules"].as_array().map(Vec::len),
        Some(1),
        "first match wins"
    );
}

#[test]
fn an_invalid_token_names_the_failed_check() {
    let b = Bastion::new(POLICY);
    let now = unix_now();
    let expired = b.key.sign(&claims_with(&[
        ("exp", json!(now - 600)),
        ("iat", json!(now - 900)),
        ("nbf", json!(now - 900)),
    ]));
    let wrong_aud = b.key.sign(&claims_with(&[("aud", json!("other"))]));
    let stranger = TestKey::rsa2("rsa-1").sign(&gitlab_claims());
    for (name, token, reason) in [
        ("expired", expired, "token_expired"),
        ("aud", wrong_aud, "wrong_audience"),
        ("forged", stranger, "bad_signature"),
    ] {
        let file = b.token_file(name, &token);
        let (status, stdout, _) = b.explain(&file, &["--json"]);
        assert_eq!(status, 77, "{name}: {stdout}");
        let r = json_of(&stdout);
        assert_eq!(r["token_error"]["reason"], json!(reason), "{name}");
        assert_eq!(
            r["token"],
            Value::Null,
            "{name}: no claims of an invalid token"
        );
        assert_eq!(r["rules"], json!([]), "{name}");
        let (status, stdout, _) = b.explain(&file, &[]);
        assert_eq!(status, 77);
        assert!(
            stdout.contains(&format!("token    INVALID ({reason})")),
            "{stdout}"
        );
    }
}

#[test]
fn bad_config_or_usage_exits_64_naming_the_problem() {
    let b = Bastion::new(
        r#"[[policy]]
name = "bad"
issuer = "https://gitlab.example.com"
max_lifetime = "5m"
match = { groups = { has = "x" } }
allow = [ { prefix = "192.0.2.0/24", ports = ["22"] } ]"#,
    );
    let token = b.token_file("t.jwt", &b.key.sign(&gitlab_claims()));
    let (status, _, stderr) = b.explain(&token, &[]);
    assert_eq!(status, 64, "{stderr}");
    assert!(
        stderr.contains("policy[0] (bad).match.groups: `has` is not a matcher operator"),
        "{stderr}"
    );
    let good = Bastion::new(POLICY);
    let (status, _, stderr) = good.explain(&good.dir.path().join("missing.jwt"), &[]);
    assert_eq!(status, 64, "{stderr}");
    assert!(stderr.contains("cannot read token file"), "{stderr}");
    let token = good.token_file("t.jwt", &good.key.sign(&gitlab_claims()));
    let (status, _, stderr) = good.explain(&token, &["--dest", "no-port"]);
    assert_eq!(status, 64, "{stderr}");
    assert!(stderr.contains("--dest"), "{stderr}");
}
