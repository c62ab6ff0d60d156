//! JSON Web Key Sets: parsing, and loading from a file or an HTTPS URL.
//! The per-issuer cache that refreshes them lives in `key_cache`.
//!
//! Each key's algorithm is fixed here, from the JWK itself (`alg`, else
//! derived from `kty`/`crv`: RSA → RS256, P-256 → ES256, P-384 → ES384,
//! Ed25519 → EdDSA). Symmetric (`oct`) keys are never taken from a JWKS, so
//! an HS256 token can never be checked against a published public key.

use std::path::{Path, PathBuf};

use sha2::Digest as _;
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use super::jwk::{KeyError, verify_key};
pub use super::key_cache::{JwksStats, JwksStatsSnapshot, KeyCache};

/// The asymmetric algorithms a JWKS key may carry.
pub const ALLOWED_ALGORITHMS: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Largest JWKS (or OIDC discovery) document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read JWKS file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read CA file {path}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA file {path} holds no usable PEM certificate")]
    BadCa {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build the HTTPS client")]
    Client(#[source] reqwest::Error),
    #[error("fetching {url} failed")]
    Fetch {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("document is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("JWKS document is not valid JSON with a `keys` array")]
    Json(#[source] serde_json::Error),
    #[error("JWKS document has no usable signing key")]
    NoUsableKeys,
    #[error("OIDC discovery document at {url} is not JSON with `issuer` and `jwks_uri`")]
    DiscoveryJson {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "OIDC discovery document at {url} names issuer {found:?}, not the configured \
         {expected:?}: refusing its keys"
    )]
    IssuerMismatch {
        url: String,
        expected: String,
        found: String,
    },
    #[error("OIDC discovery document at {url} has jwks_uri {jwks_uri:?}, not an https URL")]
    BadJwksUri { url: String, jwks_uri: String },
}

/// A verification key with the one algorithm it may verify.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The usable keys of one JWKS document.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
    /// SHA-256 of the document the keys came from: tells a refresh that
    /// brought other keys from one that brought the same.
    pub(super) fingerprint: [u8; 32],
}

#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// Parses a JWKS document. Keys that cannot be used (unknown type,
    /// encryption keys, symmetric keys, algorithm inconsistent with the key
    /// type) are skipped with a warning, so one odd key does not hide the rest.
    pub fn parse(bytes: &[u8]) -> Result<KeySet, JwksError> {
        let doc: JwksDocument = serde_json::from_slice(bytes).map_err(JwksError::Json)?;
        let mut keys = Vec::with_capacity(doc.keys.len());
        for (i, raw) in doc.keys.into_iter().enumerate() {
            match serde_json::from_value::<Jwk>(raw)
                .map_err(KeyError::Parse)
                .and_then(|jwk| verify_key(&jwk))
            {
                Ok(k) => keys.push(k),
                Err(why) => {
                    let why = crate::error_chain(&why);
                    tracing::warn!(index = i, "skipping JWKS key: {why}");
                }
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        let fingerprint = sha2::Sha256::digest(bytes).into();
        Ok(KeySet { keys, fingerprint })
    }

    /// The key for a token's `kid`. A token without `kid` is accepted only
    /// when the set holds a single key, so there is no guessing.
    pub fn find(&self, kid: Option<&str>) -> Option<&VerifyKey> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    Url {
        url: String,
        client: reqwest::Client,
    },
    /// OIDC discovery: the issuer's metadata document names the JWKS URL.
    Discovery {
        issuer: String,
        url: String,
        client: reqwest::Client,
    },
}

impl JwksSource {
    /// An HTTPS source; `ca_file` adds a trusted CA to the system roots.
    pub fn url(url: &str, ca_file: Option<&Path>) -> Result<JwksSource, JwksError> {
        Ok(JwksSource::Url {
            url: url.to_owned(),
            client: https_client(ca_file)?,
        })
    }

    /// Keys found by OIDC discovery from the `issuer` URL.
    pub fn discovery(issuer: &str, ca_file: Option<&Path>) -> Result<JwksSource, JwksError> {
        Ok(JwksSource::Discovery {
            issuer: issuer.to_owned(),
            url: super::discovery::discovery_url(issuer),
            client: https_client(ca_file)?,
        })
    }

    pub async fn fetch(&self) -> Result<KeySet, JwksError> {
        match self {
            JwksSource::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|source| JwksError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                KeySet::parse(&bytes)
            }
            JwksSource::Url { url, client } => KeySet::parse(&fetch_limited(client, url).await?),
            JwksSource::Discovery {
                issuer,
                url,
                client,
            } => super::discovery::fetch_keys(client, issuer, url).await,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            JwksSource::File(p) => p.display().to_string(),
            JwksSource::Url { url, .. } | JwksSource::Discovery { url, .. } => url.clone(),
        }
    }
}

/// The HTTPS-only client for key fetches; `ca_file` adds a trusted CA.
fn https_client(ca_file: Option<&Path>) -> Result<reqwest::Client, JwksError> {
    let mut builder = reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(FETCH_TIMEOUT)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::limited(3));
    if let Some(path) = ca_file {
        builder = builder.add_root_certificate(load_ca(path)?);
    }
    builder.build().map_err(JwksError::Client)
}

/// Reads a PEM CA certificate for reqwest.
pub fn load_ca(path: &Path) -> Result<reqwest::Certificate, JwksError> {
    let pem = std::fs::read(path).map_err(|source| JwksError::ReadCa {
        path: path.to_owned(),
        source,
    })?;
    reqwest::Certificate::from_pem(&pem).map_err(|source| JwksError::BadCa {
        path: path.to_owned(),
        source,
    })
}

pub(super) async fn fetch_limited(
    client: &reqwest::Client,
    url: &str,
) -> Result<Vec<u8>, JwksError> {
    let fetch_err = |source| JwksError::Fetch {
        url: url.to_owned(),
        source,
    };
    let mut resp = client.get(url).send().await.map_err(fetch_err)?;
    if !resp.status().is_success() {
        return Err(JwksError::HttpStatus {
            url: url.to_owned(),
            status: resp.status().as_u16(),
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(fetch_err)? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `outer: inner: innermost`, for log lines.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
