//! Authentication material for the bench: a real RSA key (openssl), its
//! JWKS file, RS256 tokens with GitLab CI's claims, the agent's `[auth]`,
//! `[[policy]]` and `[api]` sections, and the client side of the token
//! preamble.
//!
//! xtask does not link the `tcpgate` library: it builds eBPF in its build
//! script, and `cargo xtask setup` must compile before bpf-linker exists.
//! The preamble codec here follows the format documented in
//! `proxy-userspace/src/auth/preamble.rs`; a test checks it against the
//! library byte for byte.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tcpgate_tests::topology::{BASTION_RUNNER_V4, TARGET_V4};

use super::ports;

pub const ISSUER: &str = "https://gitlab.bench.invalid";
pub const AUDIENCE: &str = "tcpgate-bench";
const KID: &str = "bench-rsa";
/// Where the agent serves the grant API: the bastion's runner-side address.
pub const API: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(BASTION_RUNNER_V4), ports::GRANT_API);

/// A signing key and the JWKS file the agent trusts.
pub struct Keys {
    encoding: EncodingKey,
    jwks_path: PathBuf,
}

impl Keys {
    /// Generates an RSA-2048 key with openssl in `dir` and writes
    /// `<dir>/jwks.json`.
    pub fn generate(dir: &Path) -> Result<Keys> {
        let pem = dir.join("signing.pem");
        let output = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem)
            .output()
            .context("run openssl (apt install openssl)")?;
        ensure!(
            output.status.success(),
            "openssl genpkey failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let encoding = EncodingKey::from_rsa_pem(&std::fs::read(&pem)?)
            .context("load the generated RSA key")?;
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256)
            .context("public JWK of the signing key")?;
        jwk.common.key_id = Some(KID.to_owned());
        let mut jwk = serde_json::to_value(&jwk)?;
        jwk["use"] = json!("sig");
        let jwks_path = dir.join("jwks.json");
        std::fs::write(&jwks_path, json!({ "keys": [jwk] }).to_string())?;
        Ok(Keys {
            encoding,
            jwks_path,
        })
    }

    /// An RS256 token with a GitLab CI job's claims, valid for `lifetime_s`.
    pub fn token(&self, lifetime_s: u64) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "project_path:group/app:ref_type:branch:ref:main",
            "iat": now,
            "nbf": now - 5,
            "exp": now + lifetime_s,
            "project_path": "group/app",
            "namespace_path": "group",
            "ref": "main",
            "ref_type": "branch",
            "ref_protected": "true",
            "pipeline_source": "push",
            "job_project_path": "group/app",
            "user_login": "bench",
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(KID.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.encoding).context("sign a bench token")
    }

    /// The `[auth]`, `[[policy]]` and `[api]` sections.
    pub fn agent_sections(&self) -> String {
        let auth_ports = [
            ports::CONN_PREAMBLE,
            ports::CONN_GRANT,
            ports::IDLE,
            ports::TEARDOWN,
        ]
        .map(|p| format!("\"{p}\""))
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

/// The request preamble carrying `token` (magic, version 1, flags 0,
/// big-endian length, token).
pub fn encode_preamble(token: &str) -> Result<Vec<u8>> {
    let len = u16::try_from(token.len())
        .ok()
        .filter(|&len| len > 0 && usize::from(len) <= 16 * 1024 - 8)
        .with_context(|| format!("a {}-byte token does not fit a preamble", token.len()))?;
    let mut bytes = Vec::with_capacity(8 + token.len());
    bytes.extend_from_slice(b"TCPG");
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(token.as_bytes());
    Ok(bytes)
}

/// The status (0 = ok) and message length of a response's 8-byte header.
pub fn response_header(header: &[u8; 8]) -> Result<(u8, usize)> {
    ensure!(
        header[..4] == *b"TCPG" && header[4] == 1,
        "not a tcpgate response: {header:?}"
    );
    let len = usize::from(u16::from_be_bytes([header[6], header[7]]));
    ensure!(len <= 1024, "response message of {len} bytes");
    Ok((header[5], len))
}

/// A source-bound grant the agent issued.
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: String,
    pub expires_at: SystemTime,
}

/// `POST /v1/grants` from the calling thread's namespace (the runner's),
/// narrowed to `port` on the target and to `lifetime` (humantime, "3s").
pub fn request_grant(token: &str, port: u16, lifetime: &str) -> Result<Grant> {
    let body = json!({
        "destinations": [{ "prefix": format!("{TARGET_V4}/32"), "ports": [port.to_string()] }],
        "lifetime": lifetime,
    })
    .to_string();
    let (status, reply) = http_post(API, "/v1/grants", token, &body)?;
    ensure!(
        status == 200 || status == 201,
        "grant API answered {status}: {reply}"
    );
    let reply: serde_json::Value =
        serde_json::from_str(&reply).with_context(|| format!("grant API reply: {reply}"))?;
    let expires = reply["expires_at"]
        .as_str()
        .with_context(|| format!("grant reply lacks expires_at: {reply}"))?;
    Ok(Grant {
        id: reply["grant_id"].as_str().unwrap_or_default().to_owned(),
        expires_at: humantime::parse_rfc3339(expires)
            .with_context(|| format!("grant expires_at `{expires}`"))?,
    })
}

/// A minimal HTTP/1.1 POST (the bench needs one request per grant, from a
/// namespace thread, so no client library with its own threads).
fn http_post(addr: SocketAddr, path: &str, token: &str, body: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .with_context(|| format!("connect to the grant API at {addr}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&String::from_utf8_lossy(&raw))
}

/// Status and body of an HTTP/1.1 response (plain or chunked body).
fn parse_http_response(raw: &str) -> Result<(u16, String)> {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("incomplete HTTP response: {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("bad HTTP status line: {head:?}"))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    if !chunked {
        return Ok((status, body.to_owned()));
    }
    let mut rest = body;
    let mut out = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            bail!("truncated chunked body: {body:?}");
        };
        let size = usize::from_str_radix(size.trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok((status, out));
        }
        let chunk = after.get(..size).context("truncated chunk")?;
        out.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_layout() {
        let bytes = encode_preamble("abc").expect("fits");
        assert_eq!(bytes, b"TCPG\x01\x00\x00\x03abc");
        assert!(encode_preamble("").is_err());
        assert!(encode_preamble(&"x".repeat(16 * 1024)).is_err());
    }

    #[test]
    fn response_header_checks() {
        assert_eq!(
            response_header(b"TCPG\x01\x00\x00\x05").expect("ok"),
            (0, 5)
        );
        assert_eq!(
            response_header(b"TCPG\x01\x01\x00\x00").expect("ok"),
            (1, 0)
        );
        assert!(response_header(b"HTTP/1.1").is_err());
    }

    #[test]
    fn http_responses_plain_and_chunked() {
        let plain = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_http_response(plain).expect("ok"), (200, "{}".into()));
        let chunked = "HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(chunked).expect("ok"),
            (403, "abcde".into())
        );
        assert!(parse_http_response("garbage").is_err());
    }

    /// The bench speaks the agent's wire formats: checked against the
    /// tcpgate library itself (a dev-dependency only).
    #[test]
    fn preamble_matches_the_library() {
        let token = "eyJhbGciOiJSUzI1NiJ9.e30.c2ln";
        assert_eq!(
            encode_preamble(token).expect("fits"),
            tcpgate::auth::preamble::encode_preamble(token).expect("fits")
        );
        use tcpgate::auth::preamble::{Status, encode_response};
        for (status, code) in [(Status::Ok, 0), (Status::Denied, 1)] {
            let bytes = encode_response(status, "fine");
            let header: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
            assert_eq!(
                response_header(&header).expect("ok"),
                (code, bytes.len() - 8)
            );
        }
    }

    #[test]
    fn grant_request_body_is_what_the_api_parses() {
        let body = json!({
            "destinations": [{ "prefix": format!("{TARGET_V4}/32"), "ports": ["8004"] }],
            "lifetime": "3s",
        });
        let request: tcpgate::auth::api_types::GrantRequest =
            serde_json::from_value(body).expect("the API's request type");
        let parsed = request.parse().expect("valid");
        assert_eq!(parsed.lifetime, Some(std::time::Duration::from_secs(3)));
    }
}
