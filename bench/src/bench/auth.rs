//! Authentication for the bench: the testkit's RSA key and JWKS, tokens
//! with GitLab CI's claims, the agent's `[auth]`, `[[policy]]` and `[api]`
//! sections, and grant requests. The preamble codec, the keys and the HTTP
//! client are the testkit's (`tcpgate_tests::{preamble, tokens, http}`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context as _, Result, ensure};
use jsonwebtoken::Algorithm;
use serde_json::json;
use tcpgate_tests::preamble;
use tcpgate_tests::tokens::{AUDIENCE, ISSUER, TestKey, claims_with, jwks, unix_now};
use tcpgate_tests::topology::{BASTION_RUNNER_V4, TARGET_V4};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::ports;

/// Where the agent serves the grant API: the bastion's runner-side address.
pub const API: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(BASTION_RUNNER_V4), ports::GRANT_API);

/// A signing key and the JWKS file the agent trusts.
pub struct Keys {
    key: TestKey,
    jwks_path: PathBuf,
}

impl Keys {
    /// The testkit's RSA-2048 key (made by openssl), with `<dir>/jwks.json`.
    pub fn generate(dir: &Path) -> Result<Keys> {
        let key = TestKey::new("bench-rsa", Algorithm::RS256);
        let jwks_path = dir.join("jwks.json");
        std::fs::write(&jwks_path, jwks(&[&key]))
            .with_context(|| format!("write {}", jwks_path.display()))?;
        Ok(Keys { key, jwks_path })
    }

    /// An RS256 token with a GitLab CI job's claims, valid for `lifetime_s`.
    pub fn token(&self, lifetime_s: u64) -> String {
        let now = unix_now();
        self.key.sign(&claims_with(&[
            ("iat", now.into()),
            ("nbf", (now - 5).into()),
            ("exp", (now + lifetime_s).into()),
        ]))
    }

    /// The `[auth]`, `[[policy]]` and `[api]` sections.
    pub fn agent_sections(&self) -> String {
        self.agent_sections_with(&[])
    }

    /// [`Keys::agent_sections`] with `extra` ports allowed too.
    pub fn agent_sections_with(&self, extra: &[u16]) -> String {
        let auth_ports = [
            ports::CONN_PREAMBLE,
            ports::CONN_GRANT,
            ports::IDLE,
            ports::TEARDOWN,
            // The takeover measure's streams (an echo).
            ports::ECHO_INTERCEPTED,
        ]
        .iter()
        .chain(extra)
        // Each once, whatever `extra` repeats.
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
        format!(
            "\n[auth]\naudit_claims = [\"project_path\"]\n\n[[auth.issuer]]\nissuer = \"{ISSUER}\"\n\
             audience = \"{AUDIENCE}\"\njwks_file = {jwks:?}\n\n[[policy]]\nname = \"bench\"\n\
             issuer = \"{ISSUER}\"\nmax_lifetime = \"1h\"\nmatch = {{ project_path = \"group/app\" }}\n\
             allow = [{{ prefix = \"{TARGET_V4}/32\", ports = [{auth_ports}] }}]\n\n\
             [api]\nlisten = \"{API}\"\n\
             # Plain HTTP: the bench measures admission, not TLS handshakes.\n\
             insecure_http = true\n",
            jwks = self.jwks_path.display().to_string(),
        )
    }
}

/// Sends an encoded token `preamble` and fails unless the agent admits it:
/// the async side of `tcpgate_tests::preamble::authenticate`.
pub async fn authenticate(stream: &mut TcpStream, preamble: &[u8]) -> Result<()> {
    stream
        .write_all(preamble)
        .await
        .context("send the preamble")?;
    let mut header = [0u8; 8];
    stream
        .read_exact(&mut header)
        .await
        .context("read the agent's answer")?;
    let (status, len) = preamble::answer_header(&header)?;
    let mut message = vec![0u8; len];
    stream
        .read_exact(&mut message)
        .await
        .context("read the agent's answer")?;
    ensure!(
        status == preamble::OK,
        "the agent refused the token (status {status}): {}",
        String::from_utf8_lossy(&message)
    );
    Ok(())
}

/// A source-bound grant the agent issued.
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: String,
    pub expires_at: SystemTime,
}

/// The `POST /v1/grants` body narrowing a grant to `port` on the target and
/// to `lifetime` (humantime, "3s").
fn grant_body(ports: &[u16], lifetime: &str) -> serde_json::Value {
    let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
    json!({
        "destinations": [{ "prefix": format!("{TARGET_V4}/32"), "ports": ports }],
        "lifetime": lifetime,
    })
}

/// `POST /v1/grants` from the calling thread's namespace (the runner's).
pub fn request_grant(token: &str, port: u16, lifetime: &str) -> Result<Grant> {
    request_grant_for(token, &[port], lifetime)
}

/// [`request_grant`] for several ports.
pub fn request_grant_for(token: &str, ports: &[u16], lifetime: &str) -> Result<Grant> {
    let body = grant_body(ports, lifetime).to_string();
    let reply = tcpgate_tests::http::post_json(API, "/v1/grants", token, &body)?;
    ensure!(
        reply.status == 200 || reply.status == 201,
        "grant API answered {}: {}",
        reply.status,
        reply.body
    );
    let reply: serde_json::Value = serde_json::from_str(&reply.body)
        .with_context(|| format!("grant API reply: {}", reply.body))?;
    let expires = reply["expires_at"]
        .as_str()
        .with_context(|| format!("grant reply lacks expires_at: {reply}"))?;
    Ok(Grant {
        id: reply["grant_id"].as_str().unwrap_or_default().to_owned(),
        expires_at: humantime::parse_rfc3339(expires)
            .with_context(|| format!("grant expires_at `{expires}`"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench speaks the agent's wire formats through the testkit's
    /// codec: checked here against the tcpgate library itself (a
    /// dev-dependency only).
    #[test]
    fn testkit_preamble_matches_the_library() {
        let token = "eyJhbGciOiJSUzI1NiJ9.e30.c2ln";
        assert_eq!(
            preamble::encode(token),
            tcpgate::auth::preamble::encode_preamble(token).expect("fits")
        );
        use tcpgate::auth::preamble::{Status, encode_response};
        for (status, code) in [
            (Status::Ok, preamble::OK),
            (Status::Denied, preamble::DENIED),
        ] {
            let bytes = encode_response(status, "fine");
            let header: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
            assert_eq!(
                preamble::answer_header(&header).expect("ok"),
                (code, bytes.len() - 8)
            );
            let mut reader = bytes.as_slice();
            assert_eq!(
                preamble::read_answer(&mut reader).expect("a whole frame"),
                (code, "fine".to_owned())
            );
        }
        assert!(preamble::answer_header(b"HTTP/1.1").is_err());
    }

    #[test]
    fn grant_request_body_is_what_the_api_parses() {
        let request: tcpgate::auth::api_types::GrantRequest =
            serde_json::from_value(grant_body(&[ports::CONN_GRANT], "3s"))
                .expect("the API's request type");
        let parsed = request.parse().expect("valid");
        assert_eq!(parsed.lifetime, Some(std::time::Duration::from_secs(3)));
    }
}
