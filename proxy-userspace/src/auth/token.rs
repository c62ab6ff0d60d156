//! JWT validation against the configured issuers.
//!
//! The issuer is picked by the token's `iss` (read from the payload without
//! trusting it), then the token is fully validated with that issuer's keys.
//! The algorithm comes from the key, never from the token: the header's
//! `alg` must equal it. HS256 is accepted only for an issuer that has a
//! configured shared secret, and only against that secret.

use super::DenyReason;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::aws::AwsVerifier;
use super::config::{AuthConfig, FieldError};
use super::jwks::{JwksError, JwksStatsSnapshot, KeyCache};

/// Longest token accepted (the preamble bound).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A token whose signature, issuer, audience and times were checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedToken {
    pub issuer: String,
    pub subject: String,
    pub expires_at: SystemTime,
    pub claims: Map<String, Value>,
}

/// Why a token was rejected. [`TokenError::reason`] is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token not yet valid (nbf is in the future)")]
    NotYetValid,
    #[error("token issuer {0:?} is not accepted")]
    WrongIssuer(String),
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("no key with kid {kid:?} is known for issuer {issuer}")]
    UnknownKid { issuer: String, kid: Option<String> },
    #[error("token algorithm not allowed: {0}")]
    AlgNotAllowed(String),
    #[error("malformed token: {0}")]
    Malformed(String),
    /// An `aws-sts.` token whose AWS identity was not established.
    #[error(transparent)]
    Aws(#[from] super::aws::AwsError),
}

impl TokenError {
    /// Stable machine-readable reason for audit logs and metrics.
    pub fn reason(&self) -> &'static str {
        self.deny_reason().as_str()
    }

    #[must_use]
    pub fn deny_reason(&self) -> DenyReason {
        match self {
            TokenError::Expired => DenyReason::TokenExpired,
            TokenError::NotYetValid => DenyReason::TokenNotYetValid,
            TokenError::WrongIssuer(_) => DenyReason::WrongIssuer,
            TokenError::WrongAudience(_) => DenyReason::WrongAudience,
            TokenError::MissingExp => DenyReason::MissingExp,
            TokenError::BadSignature => DenyReason::BadSignature,
            TokenError::UnknownKid { .. } => DenyReason::UnknownKid,
            TokenError::AlgNotAllowed(_) => DenyReason::AlgNotAllowed,
            TokenError::Malformed(_) => DenyReason::MalformedToken,
            TokenError::Aws(e) => e.deny_reason(),
        }
    }
}

/// Errors loading issuer keys and secrets at startup.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid auth config: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    #[error("auth.issuer[{index}]: cannot load keys")]
    Keys {
        index: usize,
        #[source]
        source: JwksError,
    },
    #[error("auth.issuer[{index}].hs256_secret_file")]
    Secret {
        index: usize,
        #[source]
        source: super::config::SecretError,
    },
    #[error("cannot set up [auth.aws]")]
    Aws(#[source] super::aws::AwsLoadError),
}

use super::token_load::{IssuerState, load_issuer};

/// Validates tokens of all configured issuers. Cheap to clone.
#[derive(Clone)]
pub struct TokenValidator {
    issuers: Arc<HashMap<String, IssuerState>>,
    leeway_secs: u64,
    /// `[auth.aws]`: identities from signed STS requests.
    aws: Option<Arc<AwsVerifier>>,
    /// Failed key fetches (JWKS or discovery) per issuer.
    key_fetch_failures: Family<IssuerLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    issuer: String,
}

impl std::fmt::Debug for TokenValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut issuers: Vec<&String> = self.issuers.keys().collect();
        issuers.sort();
        f.debug_struct("TokenValidator")
            .field("issuers", &issuers)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

impl TokenValidator {
    /// Loads every issuer's keys. A JWKS file must load; a JWKS URL that
    /// cannot be fetched now only logs a warning and starts empty, so a
    /// GitLab outage does not keep the agent down: tokens are then rejected
    /// with `unknown_kid` until a refresh succeeds.
    pub async fn load(config: &AuthConfig) -> Result<TokenValidator, LoadError> {
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(LoadError::Invalid(errors));
        }
        let failures: Family<IssuerLabels, Counter> = Family::default();
        let mut issuers = HashMap::new();
        for (index, ic) in config.issuers.iter().enumerate() {
            let counter = failures
                .get_or_create(&IssuerLabels {
                    issuer: ic.issuer.clone(),
                })
                .clone();
            issuers.insert(ic.issuer.clone(), load_issuer(index, ic, counter).await?);
        }
        let aws = match &config.aws {
            Some(aws) => Some(Arc::new(AwsVerifier::new(aws).map_err(LoadError::Aws)?)),
            None => None,
        };
        Ok(TokenValidator {
            issuers: Arc::new(issuers),
            leeway_secs: config.leeway().as_secs(),
            aws,
            key_fetch_failures: failures,
        })
    }

    /// Registers the validator's metrics: key fetch failures per issuer,
    /// and the STS calls of `[auth.aws]`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "auth_key_fetch_failures",
            "Failed fetches of an issuer's keys (JWKS or OIDC discovery), at startup, periodic or on an unknown kid",
            self.key_fetch_failures.clone(),
        );
        if let Some(aws) = &self.aws {
            aws.register(registry);
        }
    }

    /// Refresh counters per issuer (only issuers with a JWKS).
    pub fn jwks_stats(&self) -> Vec<(String, JwksStatsSnapshot)> {
        let mut v: Vec<_> = self
            .issuers
            .iter()
            .filter_map(|(name, st)| st.keys.as_ref().map(|k| (name.clone(), k.stats())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Moves whenever any issuer's key set changes (each issuer's counter
    /// only grows, so their sum does too).
    pub fn keys_version(&self) -> u64 {
        self.issuers
            .values()
            .filter_map(|st| st.keys.as_ref())
            .map(|k| k.key_version())
            .fold(0, u64::wrapping_add)
    }

    /// Why `issuer`'s keys could not be fetched last time, while no later
    /// fetch has succeeded (explains an `unknown_kid`).
    pub fn key_problem(&self, issuer: &str) -> Option<String> {
        self.issuers
            .get(issuer)
            .and_then(|st| st.keys.as_ref())
            .and_then(|k| k.last_error())
    }

    /// Refreshes each issuer's JWKS every `refresh_interval` until `shutdown`
    /// resolves. Spawn it once next to the agent.
    pub async fn run_refresh(self, shutdown: impl Future<Output = ()>) {
        let start = tokio::time::Instant::now();
        let mut due: Vec<(Arc<KeyCache>, Duration, tokio::time::Instant)> = self
            .issuers
            .values()
            .filter_map(|st| {
                st.keys
                    .clone()
                    .map(|k| (k, st.refresh_interval, start + st.refresh_interval))
            })
            .collect();
        tokio::pin!(shutdown);
        loop {
            let Some(next) = due.iter().map(|d| d.2).min() else {
                return;
            };
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep_until(next) => {}
            }
            let now = tokio::time::Instant::now();
            for (cache, interval, at) in due.iter_mut().filter(|d| d.2 <= now) {
                cache.refresh().await;
                *at = tokio::time::Instant::now() + *interval;
            }
        }
    }

    /// Validates `token` against the issuer named by its `iss` claim, or,
    /// for an `aws-sts.` token, asks STS who signed it.
    pub async fn validate(&self, token: &str) -> Result<ValidatedToken, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        if token.starts_with(super::aws::TOKEN_PREFIX) {
            let aws = self.aws.as_ref().ok_or_else(|| {
                TokenError::WrongIssuer("AWS identities ([auth.aws] is not configured)".into())
            })?;
            return Ok(aws.verify(token, SystemTime::now()).await?);
        }
        let (header, payload) = split_untrusted(token)?;
        if header.alg.eq_ignore_ascii_case("none") {
            return Err(TokenError::AlgNotAllowed("none".into()));
        }
        if header.crit.is_some() {
            return Err(TokenError::Malformed(
                "critical header extensions are not supported".into(),
            ));
        }
        let issuer = match payload.get("iss") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(TokenError::Malformed("claim `iss` is not a string".into())),
            None => return Err(TokenError::Malformed("token has no iss claim".into())),
        };
        let state = self
            .issuers
            .get(&issuer)
            .ok_or_else(|| TokenError::WrongIssuer(issuer.clone()))?;
        let alg: Algorithm = header.alg.parse().map_err(|_| {
            TokenError::AlgNotAllowed(format!("unknown algorithm {:?}", header.alg))
        })?;
        let (key, key_alg) =
            if alg == Algorithm::HS256 {
                match &state.hs256 {
                    Some(secret) => (secret.clone(), Algorithm::HS256),
                    None => {
                        return Err(TokenError::AlgNotAllowed(
                            "HS256 is not enabled for this issuer".into(),
                        ));
                    }
                }
            } else {
                let cache = state.keys.as_ref().ok_or_else(|| {
                    TokenError::AlgNotAllowed(format!(
                        "{alg:?}: this issuer only accepts HS256 (dev secret)"
                    ))
                })?;
                let vk = cache.find(header.kid.as_deref()).await.ok_or_else(|| {
                    TokenError::UnknownKid {
                        issuer: issuer.clone(),
                        kid: header.kid.clone(),
                    }
                })?;
                (vk.key, vk.alg)
            };
        if alg != key_alg {
            return Err(TokenError::AlgNotAllowed(format!(
                "header alg {alg:?} does not match the key's {key_alg:?}"
            )));
        }
        let mut validation = Validation::new(key_alg);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[&issuer]);
        validation.set_audience(&[&state.audience]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| map_jwt_error(e.into_kind(), &issuer, &state.audience))?;
        finish(issuer, data.claims)
    }
}

/// Decodes header and payload without checking anything, to choose the
/// issuer and key. Nothing read here is trusted before the signature check.
fn split_untrusted(token: &str) -> Result<(RawHeader, Map<String, Value>), TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| TokenError::Malformed(format!("{what} is not base64url: {e}")))
    };
    let header: RawHeader = serde_json::from_slice(&decode(h, "header")?).map_err(|e| {
        TokenError::Malformed(format!("header is not a JSON object with `alg`: {e}"))
    })?;
    let payload: Map<String, Value> = serde_json::from_slice(&decode(p, "payload")?)
        .map_err(|e| TokenError::Malformed(format!("payload is not a JSON object: {e}")))?;
    Ok((header, payload))
}

fn map_jwt_error(kind: ErrorKind, issuer: &str, audience: &str) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer(issuer.to_owned()),
        ErrorKind::InvalidAudience => TokenError::WrongAudience(audience.to_owned()),
        ErrorKind::MissingRequiredClaim(c) if c == "exp" => TokenError::MissingExp,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
            TokenError::WrongAudience(audience.to_owned())
        }
        ErrorKind::MissingRequiredClaim(c) => TokenError::Malformed(format!("missing claim `{c}`")),
        ErrorKind::InvalidClaimFormat(c) => {
            TokenError::Malformed(format!("claim `{c}` has the wrong type"))
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            TokenError::AlgNotAllowed("algorithm does not match the key".into())
        }
        // Signature bytes of the wrong shape for the key (e.g. a truncated
        // ECDSA signature) are a bad signature, not a server fault.
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => {
            TokenError::BadSignature
        }
        ErrorKind::Base64(e) => TokenError::Malformed(format!("bad base64url: {e}")),
        ErrorKind::Json(e) => TokenError::Malformed(format!("bad JSON: {e}")),
        ErrorKind::Utf8(e) => TokenError::Malformed(format!("bad UTF-8: {e}")),
        other => TokenError::Malformed(format!("{other:?}")),
    }
}

fn finish(issuer: String, claims: Map<String, Value>) -> Result<ValidatedToken, TokenError> {
    let subject = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(TokenError::Malformed("token has no sub claim".into())),
    };
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or(TokenError::MissingExp)?;
    if !exp.is_finite() || exp < 0.0 {
        return Err(TokenError::Malformed("claim `exp` is out of range".into()));
    }
    let expires_at = SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(exp as u64))
        .ok_or_else(|| TokenError::Malformed("claim `exp` is out of range".into()))?;
    Ok(ValidatedToken {
        issuer,
        subject,
        expires_at,
        claims,
    })
}

#[cfg(test)]
#[path = "token_tests.rs"]
mod tests;
