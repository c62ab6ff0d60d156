//! Parsing and validation of the `[auth]` and `[[policy]]` sections.

use std::time::Duration;

use serde::Deserialize;
use tcpgate::auth::config::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Sections {
    auth: AuthConfig,
    #[serde(default)]
    policy: Vec<RuleConfig>,
}

fn parse(text: &str) -> Sections {
    toml::from_str(text).expect("config parses")
}

const GOOD: &str = r#"
    [auth]
    leeway = "30s"
    preamble_timeout = "5s"
    audit_claims = ["project_path", "ref", "pipeline_id", "job_id", "user_login"]

    [[auth.issuer]]
    issuer = "https://gitlab.example.com"
    audience = "tcpgate"
    jwks_url = "https://gitlab.example.com/oauth/discovery/keys"
    refresh_interval = "10m"
    min_refresh_interval = "30s"

    [[policy]]
    name = "deploy-db"
    issuer = "https://gitlab.example.com"
    max_lifetime = "15m"
    match = { project_path = "group/app", ref_protected = true, ref = "release/*", ref_type = ["branch", "tag"] }
    allow = [ { prefix = "192.0.2.0/24", ports = ["5432"] }, { prefix = "2001:db8::/64", ports = ["22", "8000-8099"] } ]
"#;

#[test]
fn the_documented_example_is_valid() {
    let s = parse(GOOD);
    assert_eq!(validate_all(&s.auth, &s.policy), vec![]);
    assert_eq!(s.auth.leeway(), Duration::from_secs(30));
    assert_eq!(
        s.auth.issuers[0].min_refresh_interval.get(),
        Some(Duration::from_secs(30))
    );
    assert_eq!(s.policy[0].claims["ref_protected"], MatcherSpec::Bool(true));
    assert_eq!(
        s.policy[0].claims["ref_type"],
        MatcherSpec::List(vec!["branch".into(), "tag".into()])
    );
}

#[test]
fn defaults_apply_when_fields_are_omitted() {
    let s = parse(
        r#"[auth]
        [[auth.issuer]]
        issuer = "i"
        audience = "a"
        jwks_file = "/etc/tcpgate/jwks.json""#,
    );
    assert_eq!(s.auth.preamble_timeout(), DEFAULT_PREAMBLE_TIMEOUT);
    assert_eq!(
        s.auth.issuers[0].refresh_interval.get(),
        Some(DEFAULT_REFRESH_INTERVAL)
    );
    assert_eq!(s.auth.validate(), vec![]);
}

#[test]
fn unknown_fields_are_rejected() {
    let err = toml::from_str::<Sections>("[auth]\nleway = \"1s\"\n")
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("leway"), "{err}");
}

#[test]
fn every_bad_field_is_reported_with_its_path() {
    let s = parse(
        r#"
        [auth]
        leeway = "soon"
        preamble_timeout = "0s"
        [[auth.issuer]]
        issuer = "https://gitlab.example.com"
        audience = ""
        jwks_url = "http://gitlab.example.com/oauth/discovery/keys"
        refresh_interval = "0m"
        [[auth.issuer]]
        issuer = "other.example.com"
        audience = "tcpgate"
        [[auth.issuer]]
        issuer = "https://discovered.example.com"
        audience = "tcpgate"
        [[policy]]
        name = "ok"
        max_lifetime = "15m"
        allow = [ { prefix = "192.0.2.0/24", ports = ["5432"] } ]
        [[policy]]
        name = "deploy-db"
        issuer = "https://unknown.example.com"
        max_lifetime = "fifteen"
        match = { project_id = 1.5, ref_type = [] }
        allow = [ { prefix = "192.0.2.0/33", ports = ["0", "90-80"] } ]
        [[policy]]
        name = "ok"
        max_lifetime = "0s"
        allow = []
        "#,
    );
    let errors: Vec<String> = validate_all(&s.auth, &s.policy)
        .iter()
        .map(ToString::to_string)
        .collect();
    let expect = [
        "auth.leeway: `soon` is not a duration",
        "auth.preamble_timeout: must be greater than zero",
        "auth.issuer[0].audience: must not be empty",
        "auth.issuer[0].jwks_url: must be https",
        "auth.issuer[0].refresh_interval: must be greater than zero",
        // Without keys configured, the issuer is for OIDC discovery: a URL.
        "auth.issuer[1].issuer: without jwks_url or jwks_file the issuer must be an https URL",
        "policy[0] (ok).issuer: required",
        "policy[1] (deploy-db).issuer: issuer `https://unknown.example.com` is not configured",
        "policy[1] (deploy-db).max_lifetime: `fifteen` is not a duration",
        "policy[1] (deploy-db).match.project_id: ",
        "policy[1] (deploy-db).match.ref_type: ",
        "policy[1] (deploy-db).allow[0].prefix: ",
        "policy[1] (deploy-db).allow[0].ports[0]: ",
        "policy[1] (deploy-db).allow[0].ports[1]: ",
        "policy[2] (ok).issuer: required",
        "policy[2] (ok).name: rule name `ok` is already used by policy[0]",
        "policy[2] (ok).max_lifetime: must be greater than zero",
        "policy[2] (ok).allow: ",
    ];
    for want in expect {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing `{want}` in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), expect.len(), "{errors:#?}");
}
