//! JSON Web Key Sets: parsing, loading from a file or an HTTPS URL, and a
//! per-issuer cache that refreshes periodically and on unknown `kid`s.
//!
//! Each key's algorithm is fixed here, from the JWK itself (`alg`, else
//! derived from `kty`/`crv`: RSA → RS256, P-256 → ES256, P-384 → ES384,
//! Ed25519 → EdDSA). Symmetric (`oct`) keys are never taken from a JWKS, so
//! an HS256 token can never be checked against a published public key.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sha2::Digest as _;
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::time::Instant;

use super::jwk::{KeyError, verify_key};

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
    fingerprint: [u8; 32],
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

/// Refresh counters of one issuer's key cache, for metrics.
#[derive(Debug, Default)]
pub struct JwksStats {
    pub refresh_attempts: AtomicU64,
    pub refresh_failures: AtomicU64,
    /// Unknown-`kid` refreshes skipped because one ran too recently.
    pub refresh_rate_limited: AtomicU64,
}

/// A point-in-time copy of [`JwksStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct JwksStatsSnapshot {
    pub refresh_attempts: u64,
    pub refresh_failures: u64,
    pub refresh_rate_limited: u64,
}

/// The current keys of one issuer, with bounded on-demand refresh.
#[derive(Debug)]
pub struct KeyCache {
    source: JwksSource,
    current: RwLock<Arc<KeySet>>,
    /// Serializes fetches; holds the time of the last on-demand refresh.
    on_demand: tokio::sync::Mutex<Option<Instant>>,
    /// Bumped after every fetch attempt, so waiters can tell one happened.
    generation: AtomicU64,
    /// Bumped when a fetch brought a different key set (rotation).
    key_version: AtomicU64,
    min_refresh_interval: Duration,
    stats: JwksStats,
    /// Why the last fetch failed; `None` once one succeeds.
    last_error: RwLock<Option<String>>,
    /// `tcpgate_auth_key_fetch_failures_total` for this issuer.
    failures_metric: prometheus_client::metrics::counter::Counter,
}

impl KeyCache {
    pub fn new(source: JwksSource, initial: KeySet, min_refresh_interval: Duration) -> KeyCache {
        KeyCache {
            source,
            current: RwLock::new(Arc::new(initial)),
            on_demand: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            key_version: AtomicU64::new(0),
            min_refresh_interval,
            stats: JwksStats::default(),
            last_error: RwLock::new(None),
            failures_metric: prometheus_client::metrics::counter::Counter::default(),
        }
    }

    /// Counts every failed fetch in `counter` too (the metric).
    #[must_use]
    pub fn counting_failures(
        mut self,
        counter: prometheus_client::metrics::counter::Counter,
    ) -> KeyCache {
        self.failures_metric = counter;
        self
    }

    /// Why the last fetch failed, while no later fetch has succeeded.
    pub fn last_error(&self) -> Option<String> {
        match self.last_error.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set_last_error(&self, error: Option<String>) {
        match self.last_error.write() {
            Ok(mut g) => *g = error,
            Err(poisoned) => *poisoned.into_inner() = error,
        }
    }

    pub fn keys(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Moves whenever the key set changes; answers verified with the old
    /// keys are stale then.
    pub fn key_version(&self) -> u64 {
        self.key_version.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> JwksStatsSnapshot {
        JwksStatsSnapshot {
            refresh_attempts: self.stats.refresh_attempts.load(Ordering::Relaxed),
            refresh_failures: self.stats.refresh_failures.load(Ordering::Relaxed),
            refresh_rate_limited: self.stats.refresh_rate_limited.load(Ordering::Relaxed),
        }
    }

    /// Looks up `kid`; on a miss, refreshes once (rate-limited, shared with
    /// concurrent misses) and looks again.
    pub async fn find(&self, kid: Option<&str>) -> Option<VerifyKey> {
        if let Some(k) = self.keys().find(kid) {
            return Some(k.clone());
        }
        self.refresh_on_demand().await;
        self.keys().find(kid).cloned()
    }

    async fn refresh_on_demand(&self) {
        let seen = self.generation.load(Ordering::Acquire);
        let mut last = self.on_demand.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return; // Another task refreshed while we waited: share its result.
        }
        if last.is_some_and(|t| t.elapsed() < self.min_refresh_interval) {
            self.stats
                .refresh_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        self.fetch_and_swap("unknown kid").await;
    }

    /// Refreshes now (used by the periodic task). Not rate-limited.
    pub async fn refresh(&self) {
        let _serialized = self.on_demand.lock().await;
        self.fetch_and_swap("periodic").await;
    }

    async fn fetch_and_swap(&self, why: &str) {
        self.stats.refresh_attempts.fetch_add(1, Ordering::Relaxed);
        match self.source.fetch().await {
            Ok(set) => {
                tracing::debug!(source = %self.source.describe(), keys = set.len(), why, "JWKS refreshed");
                let changed = {
                    let mut current = self
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let changed = current.fingerprint != set.fingerprint;
                    *current = Arc::new(set);
                    changed
                };
                if changed {
                    self.key_version.fetch_add(1, Ordering::AcqRel);
                }
                self.set_last_error(None);
            }
            Err(e) => {
                self.stats.refresh_failures.fetch_add(1, Ordering::Relaxed);
                self.failures_metric.inc();
                self.set_last_error(Some(error_chain(&e)));
                tracing::warn!(source = %self.source.describe(), why, error = %error_chain(&e),
                    "JWKS refresh failed; keeping the last good key set");
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }
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
