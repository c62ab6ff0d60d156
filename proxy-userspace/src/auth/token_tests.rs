//! The validator's metrics: key fetch failures counted per issuer, from
//! the first fetch at startup to the refresh an unknown `kid` triggers.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prometheus_client::registry::Registry;

use super::*;

const ISSUER: &str = "https://ci.example";

fn scrape(validator: &TokenValidator) -> String {
    let mut registry = Registry::with_prefix("tcpgate");
    validator.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text
}

fn failures(text: &str) -> Option<&str> {
    let series = format!("tcpgate_auth_key_fetch_failures_total{{issuer=\"{ISSUER}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(series.as_str()))
}

#[tokio::test]
async fn failed_key_fetches_are_counted_per_issuer() {
    // Nothing listens on port 1 of loopback: every fetch fails at once.
    let auth: AuthConfig = toml::from_str(&format!(
        "[[issuer]]\nissuer = {ISSUER:?}\naudience = \"tcpgate\"\n\
         jwks_url = \"https://127.0.0.1:1/keys\"\n"
    ))
    .expect("auth config");
    let validator = TokenValidator::load(&auth)
        .await
        .expect("starts without keys");
    let text = scrape(&validator);
    assert_eq!(failures(&text), Some("1"), "{text}");
    // No [auth.aws]: no STS series.
    assert!(!text.contains("aws_sts"), "{text}");

    let part = |json: &str| URL_SAFE_NO_PAD.encode(json);
    let token = format!(
        "{}.{}.c2ln",
        part(r#"{"alg":"RS256","kid":"k1"}"#),
        part(&format!(r#"{{"iss":"{ISSUER}"}}"#))
    );
    let err = validator.validate(&token).await.expect_err("no keys");
    assert!(matches!(err, TokenError::UnknownKid { .. }), "{err}");
    assert_eq!(failures(&scrape(&validator)), Some("2"));
}
