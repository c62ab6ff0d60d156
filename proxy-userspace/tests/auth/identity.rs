//! Tokens shaped like the real ones of each documented identity source
//! (claims, `aud` as a string or a list, `kid` habits, key types), checked
//! by signature and then by the example policy of docs/identity.md: each
//! admitted, and each denied by a claim, nested and array claims included.

use std::net::SocketAddr;
use std::time::SystemTime;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tcpgate::auth::{AuthConfig, Policy, RuleConfig, TokenValidator};

use crate::support::*;

const GITHUB: &str = "https://token.actions.githubusercontent.com";
const K8S: &str = "https://kubernetes.default.svc.cluster.local";
const OKTA: &str = "https://example.okta.com/oauth2/default";

/// The bastion side of docs/identity.md, one issuer per source, with keys
/// from files (`@DIR@` is the key directory).
const CONFIG: &str = r#"
[auth]
[[auth.issuer]]
issuer = "https://gitlab.example.com"
audience = "tcpgate"
jwks_file = "@DIR@/gitlab.json"
[[auth.issuer]]
issuer = "https://token.actions.githubusercontent.com"
audience = "https://github.com/octo-org"
jwks_file = "@DIR@/github.json"
[[auth.issuer]]
issuer = "https://kubernetes.default.svc.cluster.local"
audience = "tcpgate"
jwks_file = "@DIR@/k8s.json"
[[auth.issuer]]
issuer = "https://example.okta.com/oauth2/default"
audience = "api://default"
jwks_file = "@DIR@/okta.json"

[[policy]]
name = "gitlab-deploy"
issuer = "https://gitlab.example.com"
max_lifetime = "15m"
match = { project_path = "group/app", ref_protected = true, aud = { contains = "tcpgate" } }
allow = [ { prefix = "192.0.2.10", ports = ["5432"] } ]

[[policy]]
name = "github-deploy"
issuer = "https://token.actions.githubusercontent.com"
max_lifetime = "15m"
match = { repository = "octo-org/octo-repo", ref = "refs/heads/main", environment = "production", job_workflow_ref = "octo-org/octo-automation/.github/workflows/deploy.yml@refs/heads/main", runner_environment = "self-hosted" }
allow = [ { prefix = "192.0.2.10", ports = ["5432"] } ]

[[policy]]
name = "k8s-ci"
issuer = "https://kubernetes.default.svc.cluster.local"
max_lifetime = "10m"
match = { "kubernetes.io.namespace" = "ci", "kubernetes.io.serviceaccount.name" = "deployer", "kubernetes.io.pod.name" = "deploy-*" }
allow = [ { prefix = "192.0.2.10", ports = ["5432"] } ]

[[policy]]
name = "okta-service"
issuer = "https://example.okta.com/oauth2/default"
max_lifetime = "1h"
match = { cid = "0oa8f5j3ecb5w3dF35d7", scp = { contains = "tcpgate.connect" } }
allow = [ { prefix = "192.0.2.10", ports = ["5432"] } ]
"#;

#[derive(Deserialize)]
struct Sections {
    auth: AuthConfig,
    policy: Vec<RuleConfig>,
}

/// One signing key per issuer, as each publishes them.
struct Issuers {
    _dir: tempfile::TempDir,
    gitlab: TestKey,
    github: TestKey,
    k8s: TestKey,
    okta: TestKey,
    validator: TokenValidator,
    policy: Policy,
}

async fn issuers() -> Issuers {
    let dir = tempfile::tempdir().expect("tempdir");
    // GitLab: a short random kid; GitHub: a hex thumbprint; Kubernetes: the
    // base64url SHA-256 of the key (here an ES256 service-account key);
    // Okta: a random 43-character kid. All RS256 but Kubernetes.
    let gitlab = TestKey::new(
        "kewiQq9jiC84CvSsJYOB-N6A8WFLSV20Mb-y7IlWDSQ",
        Algorithm::RS256,
    );
    let github = TestKey::new("cc413527-173f-5a05-976e-9c52b1d7b431", Algorithm::RS256);
    let k8s = TestKey::new(
        "JRmuAvIL7wOKpzUV7x9Dc4i2tNdOa6YGxpRlpfLG7rs",
        Algorithm::ES256,
    );
    let okta = TestKey::rsa2("Yl3Fc4bKbUfMJaMS5GtSa1SK0i8tV2OaOH3pM6zZb-E");
    for (name, key) in [
        ("gitlab", &gitlab),
        ("github", &github),
        ("k8s", &k8s),
        ("okta", &okta),
    ] {
        std::fs::write(dir.path().join(format!("{name}.json")), jwks(&[key])).expect("jwks");
    }
    let text = CONFIG.replace("@DIR@", &dir.path().display().to_string());
    let s: Sections = toml::from_str(&text).expect("config parses");
    let policy = Policy::from_config(&s.policy, &s.auth).expect("policy valid");
    let validator = TokenValidator::load(&s.auth).await.expect("validator");
    Issuers {
        _dir: dir,
        gitlab,
        github,
        k8s,
        okta,
        validator,
        policy,
    }
}

fn db() -> SocketAddr {
    "192.0.2.10:5432".parse().expect("addr")
}

impl Issuers {
    /// Validates and decides: `Ok(rule)` or `Err(reason)`.
    async fn decide(&self, key: &TestKey, claims: &Value) -> Result<String, String> {
        let token = self
            .validator
            .validate(&key.sign(claims))
            .await
            .map_err(|e| e.reason().to_owned())?;
        self.policy
            .decide(&token, db(), SystemTime::now())
            .map(|d| d.rule)
            .map_err(|e| e.reason().to_owned())
    }

    /// `base` admits by `rule`; each change of one claim denies.
    async fn check(&self, key: &TestKey, base: Value, rule: &str, denials: &[(&str, Value)]) {
        assert_eq!(self.decide(key, &base).await, Ok(rule.to_owned()), "{base}");
        for (path, value) in denials {
            let changed = with(&base, path, value.clone());
            assert_eq!(
                self.decide(key, &changed).await,
                Err("no_rule_matched".to_owned()),
                "{path} = {value}"
            );
        }
    }
}

/// `claims` with the value at a `/`-separated path replaced.
fn with(claims: &Value, path: &str, value: Value) -> Value {
    let mut c = claims.clone();
    let mut at: &mut Map<String, Value> = c.as_object_mut().expect("object");
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        at = at[*part].as_object_mut().expect("nested object");
    }
    at.insert(parts[parts.len() - 1].to_owned(), value);
    c
}

#[tokio::test]
async fn gitlab_id_token_with_an_audience_list() {
    let i = issuers().await;
    // `id_tokens: { TCPGATE_TOKEN: { aud: [tcpgate, vault] } }` gives a list.
    let base = claims_with(&[("aud", json!(["tcpgate", "https://vault.example.com"]))]);
    i.check(
        &i.gitlab,
        base,
        "gitlab-deploy",
        &[
            ("ref_protected", json!("false")),
            ("project_path", json!("group/other")),
        ],
    )
    .await;
    // The single-string form GitLab sends for one audience also matches.
    assert_eq!(
        i.decide(&i.gitlab, &gitlab_claims()).await,
        Ok("gitlab-deploy".into())
    );
}

fn github_claims() -> Value {
    let now = unix_now();
    json!({
        "jti": "example-id",
        "sub": "repo:octo-org/octo-repo:environment:production",
        "environment": "production",
        "aud": "https://github.com/octo-org",
        "ref": "refs/heads/main",
        "sha": "example-sha",
        "repository": "octo-org/octo-repo",
        "repository_owner": "octo-org",
        "actor_id": "12",
        "repository_visibility": "private",
        "repository_id": "74",
        "repository_owner_id": "65",
        "run_id": "example-run-id",
        "run_number": "10",
        "run_attempt": "2",
        "runner_environment": "self-hosted",
        "actor": "octocat",
        "workflow": "example-workflow",
        "head_ref": "",
        "base_ref": "",
        "event_name": "workflow_dispatch",
        "ref_type": "branch",
        "ref_protected": "true",
        "workflow_ref": "octo-org/octo-repo/.github/workflows/deploy.yml@refs/heads/main",
        "workflow_sha": "example-sha",
        "job_workflow_ref": "octo-org/octo-automation/.github/workflows/deploy.yml@refs/heads/main",
        "job_workflow_sha": "example-sha",
        "iss": GITHUB,
        "nbf": now - 5,
        "iat": now,
        "exp": now + 300,
    })
}

#[tokio::test]
async fn github_actions_oidc_token() {
    let i = issuers().await;
    i.check(
        &i.github,
        github_claims(),
        "github-deploy",
        &[
            ("repository", json!("octo-org/fork")),
            ("ref", json!("refs/heads/feature")),
            ("environment", json!("staging")),
            (
                "job_workflow_ref",
                json!("octo-org/octo-repo/.github/workflows/evil.yml@refs/heads/main"),
            ),
            ("runner_environment", json!("github-hosted")),
        ],
    )
    .await;
    // The audience is the owner URL unless the workflow asks for another.
    let other_aud = with(&github_claims(), "aud", json!("sts.amazonaws.com"));
    assert_eq!(
        i.decide(&i.github, &other_aud).await,
        Err("wrong_audience".into())
    );
}

fn k8s_claims() -> Value {
    let now = unix_now();
    json!({
        "aud": ["tcpgate"],
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "iss": K8S,
        "jti": "9d2f4e8c-0f7b-4c43-a1b0-7b5b0e6d1c2a",
        "kubernetes.io": {
            "namespace": "ci",
            "node": { "name": "worker-1", "uid": "646e7c5e-32d6-4d42-9dbd-e504e6cbe6b1" },
            "pod": { "name": "deploy-7c9f6d8b5-x2x4q", "uid": "5e0bd49b-f040-43b0-99b7-22765a53f7f3" },
            "serviceaccount": { "name": "deployer", "uid": "14ee3fa4-a7e2-420f-9f9a-dbc4507c3798" },
            "warnafter": now + 300,
        },
        "sub": "system:serviceaccount:ci:deployer",
    })
}

#[tokio::test]
async fn kubernetes_projected_service_account_token() {
    let i = issuers().await;
    i.check(
        &i.k8s,
        k8s_claims(),
        "k8s-ci",
        &[
            ("kubernetes.io/namespace", json!("prod")),
            ("kubernetes.io/serviceaccount/name", json!("default")),
            ("kubernetes.io/pod/name", json!("debug-shell")),
        ],
    )
    .await;
    // A token for the API server's audience is not for tcpgate.
    let api_aud = with(&k8s_claims(), "aud", json!([K8S]));
    assert_eq!(
        i.decide(&i.k8s, &api_aud).await,
        Err("wrong_audience".into())
    );
}

fn okta_claims() -> Value {
    let now = unix_now();
    json!({
        "ver": 1,
        "jti": "AT.0mP4JKAZX1iACIT4vbEDF7LpvDVjxypPMf0D7uX39RE",
        "iss": OKTA,
        "aud": "api://default",
        "iat": now,
        "exp": now + 3600,
        "cid": "0oa8f5j3ecb5w3dF35d7",
        "scp": ["tcpgate.connect", "inventory.read"],
        "sub": "0oa8f5j3ecb5w3dF35d7",
    })
}

#[tokio::test]
async fn generic_oidc_client_credentials_token() {
    let i = issuers().await;
    i.check(
        &i.okta,
        okta_claims(),
        "okta-service",
        &[
            ("scp", json!(["inventory.read"])),
            // The scope alone as a string is still an element; another is not.
            ("scp", json!("inventory.read")),
            ("cid", json!("0oaSOMEONEELSE")),
        ],
    )
    .await;
}
