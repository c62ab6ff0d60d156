//! Identity sources end to end through the agent: keys found by OIDC
//! discovery (followed on rotation, refused from a document that names
//! another issuer), and admission by a nested claim and an array claim.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Result, ensure};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, authenticate, echo_service, policy};
use tcpgate_tests::require_root;
use tcpgate_tests::tokens::{TestKey, claims_with, jwks};
use tcpgate_tests::{eventually, wait_events};

/// Authenticates to the echo service on port 9000: (status, message), and
/// for an admission, proves bytes flow.
fn attempt(fx: &AuthFixture, token: &str) -> Result<(u8, String)> {
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, token)?;
    if status == 0 {
        stream.write_all(b"ping")?;
        let mut back = [0u8; 4];
        stream.read_exact(&mut back)?;
        ensure!(&back == b"ping", "echo through the splice");
    }
    Ok((status, message))
}

#[test]
fn identity_discovery_admits_follows_rotation_and_refuses_another_issuer() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let launch = Launch {
        discovery: true,
        ..Launch::default()
    };
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    let server = echo_service(&fx, b"")?;
    let claims = claims_with(&[("iss", json!(fx.issuer))]);
    let (status, message) = attempt(&fx, &fx.keys.rsa.sign(&claims))?;
    ensure!(
        status == 0,
        "a key found through discovery admits: {message}"
    );

    // Rotation: a new key appears behind the discovered jwks_uri.
    let rotated = TestKey::rsa2("rsa-2");
    fx.jwks
        .set_document(jwks(&[&fx.keys.rsa, &fx.keys.ec, &fx.keys.ed, &rotated]));
    let (status, message) = attempt(&fx, &rotated.sign(&claims))?;
    ensure!(status == 0, "the rotated key admits: {message}");

    // The document now names another issuer: the new key it leads to is
    // never taken, and the agent says why.
    fx.jwks.serve_discovery("https://evil.example.com");
    let planted = TestKey::new("ec-planted", Algorithm::ES256);
    fx.jwks.set_document(jwks(&[&fx.keys.rsa, &planted]));
    let token = planted.sign(&claims);
    let mut answers = Vec::new();
    eventually(
        Duration::from_secs(20),
        "the agent refuses the document",
        || {
            answers.push(attempt(&fx, &token).map_err(|e| e.to_string()));
            // The refusal names both issuers (however the log quotes them).
            let logs = fx.agent.logs();
            logs.lines().any(|l| {
                l.contains("refusing its keys")
                    && l.contains("https://evil.example.com")
                    && l.contains("not the configured")
                    && l.contains(&fx.issuer)
            })
        },
    )
    .map_err(|e| anyhow::Error::new(e).context(fx.agent.logs_tail(20)))?;
    answers.push(attempt(&fx, &token).map_err(|e| e.to_string()));
    for answer in &answers {
        ensure!(
            matches!(answer, Ok((1, m)) if m == "access denied (unknown_kid)"),
            "a key from the refused document must not admit: {answer:?}"
        );
    }
    // The last good keys still work.
    let (status, message) = attempt(&fx, &fx.keys.rsa.sign(&claims))?;
    ensure!(status == 0, "the last good key set stays: {message}");
    ensure!(
        server.stop()?.len() == 3,
        "exactly the three admissions reached the service"
    );
    Ok(())
}

const NESTED: &str = r#"
[[policy]]
name = "k8s-deploy"
issuer = "https://gitlab.example.com"
max_lifetime = "10m"
match = { "kubernetes.io.namespace" = "ci", "kubernetes.io.serviceaccount.name" = "deployer", groups = { contains = "deployers" } }
allow = [ { prefix = "192.0.2.0/24", ports = ["9000"] } ]
"#;

fn nested(namespace: &str, groups: Value) -> Value {
    claims_with(&[
        (
            "kubernetes.io",
            json!({
                "namespace": namespace,
                "serviceaccount": { "name": "deployer", "uid": "4b4c1c6e-8bd4-4ad1-a2a5-0c5e4c7a52d1" },
            }),
        ),
        ("groups", groups),
    ])
}

#[test]
fn identity_nested_claim_and_array_claim_admit_and_deny() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start_with(NESTED, &[])?;
    let server = echo_service(&fx, b"")?;
    let (status, message) = attempt(
        &fx,
        &fx.keys
            .rsa
            .sign(&nested("ci", json!(["devs", "deployers"]))),
    )?;
    ensure!(
        status == 0,
        "nested namespace and group element admit: {message}"
    );
    let refused = [
        nested("prod", json!(["deployers"])),
        nested("ci", json!(["devs"])),
        // A single value where the rule reads elements still must match.
        nested("ci", json!("devs")),
        // The top-level `namespace` is not `kubernetes.io.namespace`.
        claims_with(&[("namespace", json!("ci")), ("groups", json!(["deployers"]))]),
    ];
    for claims in &refused {
        let (status, message) = attempt(&fx, &fx.keys.rsa.sign(claims))?;
        ensure!(
            status == 1 && message == "access denied (no_rule_matched)",
            "{claims}: {status} {message}"
        );
    }
    let denied = wait_events(&fx.agent, "connection_denied", refused.len())?;
    ensure!(denied.len() == refused.len(), "{denied:?}");
    ensure!(
        server.stop()?.len() == 1,
        "only the admitted client reached the service"
    );
    Ok(())
}
