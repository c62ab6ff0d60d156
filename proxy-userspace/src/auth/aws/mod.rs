//! AWS IAM identities, proven the way HashiCorp Vault's `aws` auth method
//! proves them: the runner signs an STS `GetCallerIdentity` request with
//! its credentials and hands the signed request over (see [`request`]);
//! the bastion checks it is meant for this bastion and recent, sends it to
//! the configured STS endpoint, and takes STS's answer as the identity
//! ([`identity`]). The runner's secret never leaves the runner, and STS
//! alone judges the signature.
//!
//! - [`config`]: the `[auth.aws]` section.
//! - [`sigv4`]: the signer the runner side uses.
//! - [`AwsVerifier`]: the bastion side, with a bound on concurrent STS
//!   calls and a timeout, each counted in metrics.

pub mod config;
pub mod identity;
pub mod request;
pub mod runner;
pub mod sigv4;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::DenyReason;
use super::token::ValidatedToken;
pub use config::AwsConfig;
use identity::AnswerError;
pub use request::{RequestError, SignedRequest, TOKEN_PREFIX};

/// Longest STS answer read (a real one is under 1 KiB).
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// An STS identity carries no expiry of its own: grants from it are bounded
/// by the rule's `max_lifetime`, and never exceed the longest STS session.
const IDENTITY_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Why an AWS identity was not established. Never an admission. The
/// inner errors are part of the message (not sources): audit details and
/// the grant API's log line show `to_string()` alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsError {
    #[error("refused before asking STS: {0}")]
    Request(RequestError),
    #[error("too many STS calls in flight ([auth.aws] max_concurrent = {0})")]
    Busy(usize),
    #[error("this signed request was already used; each is good for one connection or grant")]
    Replayed,
    #[error("too many signed requests remembered against replay ([auth.aws] max_remembered = {0})")]
    TooManyRemembered(usize),
    #[error("STS did not answer within {0:?} ([auth.aws] sts_timeout)")]
    Timeout(Duration),
    #[error("STS at {endpoint} is unreachable: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("STS refused the signed request (HTTP {status}): {detail}")]
    Refused { status: u16, detail: String },
    #[error("STS failed (HTTP {status})")]
    StsFailed { status: u16 },
    #[error("{0}")]
    Answer(AnswerError),
}

impl From<RequestError> for AwsError {
    fn from(e: RequestError) -> Self {
        AwsError::Request(e)
    }
}

impl From<AnswerError> for AwsError {
    fn from(e: AnswerError) -> Self {
        AwsError::Answer(e)
    }
}

impl AwsError {
    #[must_use]
    pub fn deny_reason(&self) -> DenyReason {
        match self {
            AwsError::Request(RequestError::WrongServerId { .. }) => DenyReason::AwsWrongServerId,
            AwsError::Request(RequestError::Stale { .. }) => DenyReason::AwsRequestStale,
            AwsError::Request(_) => DenyReason::AwsRequestInvalid,
            AwsError::Replayed => DenyReason::AwsRequestReplayed,
            AwsError::Busy(_) | AwsError::TooManyRemembered(_) => DenyReason::StsBusy,
            AwsError::Refused { .. } => DenyReason::StsRefused,
            AwsError::Timeout(_)
            | AwsError::Unreachable { .. }
            | AwsError::StsFailed { .. }
            | AwsError::Answer(_) => DenyReason::StsUnavailable,
        }
    }

    /// The `result` label of `tcpgate_aws_sts_calls_total`.
    fn result(&self) -> &'static str {
        match self {
            AwsError::Request(_) | AwsError::Replayed => "not_sent",
            AwsError::Busy(_) | AwsError::TooManyRemembered(_) => "busy",
            AwsError::Timeout(_) => "timeout",
            AwsError::Unreachable { .. } => "unreachable",
            AwsError::Refused { .. } => "refused",
            AwsError::StsFailed { .. } | AwsError::Answer(_) => "failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The STS calls' metrics.
#[derive(Clone, Debug, Default)]
struct AwsMetrics {
    calls: Family<ResultLabels, Counter>,
    in_flight: Gauge,
    max_concurrent: Gauge,
    remembered: Gauge,
}

/// Counts one STS call in flight while it lives: also when the caller
/// gives up on the call (a shed connection drops its admission).
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a Gauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Checks signed requests and asks STS who signed them. Cheap to share.
#[derive(Debug)]
pub struct AwsVerifier {
    config: AwsConfig,
    endpoint: reqwest::Url,
    /// `host[:port]` of `endpoint`: the `Host` requests must be signed with.
    authority: String,
    client: reqwest::Client,
    slots: Arc<tokio::sync::Semaphore>,
    /// Signatures of the requests seen, until each ages out of `max_age`.
    seen: std::sync::Mutex<std::collections::HashMap<String, SystemTime>>,
    metrics: AwsMetrics,
}

/// Why the verifier cannot be built from a validated config.
#[derive(Debug, thiserror::Error)]
pub enum AwsLoadError {
    #[error("auth.aws.sts_endpoint is not a URL")]
    Endpoint(#[source] url_error::ParseError),
    #[error("auth.aws.ca_file")]
    Ca(#[source] super::jwks::JwksError),
    #[error("cannot build the STS HTTP client")]
    Client(#[source] reqwest::Error),
}

/// reqwest's URL parse error, named without a direct `url` dependency.
mod url_error {
    pub type ParseError = <reqwest::Url as std::str::FromStr>::Err;
}

impl AwsVerifier {
    pub fn new(config: &AwsConfig) -> Result<AwsVerifier, AwsLoadError> {
        let endpoint = reqwest::Url::parse(&config.sts_endpoint).map_err(AwsLoadError::Endpoint)?;
        // No redirects: the request goes to the configured endpoint only.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.sts_timeout())
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &config.ca_file {
            builder =
                builder.add_root_certificate(super::jwks::load_ca(path).map_err(AwsLoadError::Ca)?);
        }
        let metrics = AwsMetrics::default();
        metrics
            .max_concurrent
            .set(i64::try_from(config.max_concurrent).unwrap_or(i64::MAX));
        Ok(AwsVerifier {
            config: config.clone(),
            authority: request::authority(&endpoint),
            endpoint,
            client: builder.build().map_err(AwsLoadError::Client)?,
            slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent)),
            seen: std::sync::Mutex::default(),
            metrics,
        })
    }

    /// The name rules give as `issuer`.
    #[must_use]
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// Registers `tcpgate_aws_sts_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "aws_sts_calls",
            "AWS identity requests by outcome: ok, not_sent (refused by the bastion's own checks), busy, timeout, unreachable, refused (by STS), failed",
            self.metrics.calls.clone(),
        );
        registry.register(
            "aws_sts_in_flight",
            "STS GetCallerIdentity calls in flight",
            self.metrics.in_flight.clone(),
        );
        registry.register(
            "aws_remembered_requests",
            "Signed requests remembered against replay until they age out ([auth.aws] max_remembered bounds it)",
            self.metrics.remembered.clone(),
        );
        registry.register(
            "aws_sts_max_concurrent",
            "[auth.aws] max_concurrent: STS calls allowed in flight at once",
            self.metrics.max_concurrent.clone(),
        );
    }

    /// Establishes the AWS identity behind `token` (an `aws-sts.` token).
    pub async fn verify(&self, token: &str, now: SystemTime) -> Result<ValidatedToken, AwsError> {
        let result = self.verify_inner(token, now).await;
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.result(),
        };
        self.metrics
            .calls
            .get_or_create(&ResultLabels { result: label })
            .inc();
        result
    }

    async fn verify_inner(&self, token: &str, now: SystemTime) -> Result<ValidatedToken, AwsError> {
        let request = SignedRequest::decode(token)?;
        let expect = request::Expect {
            server_id: &self.config.server_id,
            host: &self.authority,
            max_age: self.config.max_age(),
            region: self.config.region.as_deref(),
        };
        let checked = request.check(&expect, now)?;
        // Before STS: a replay costs no STS call. A request refused later
        // stays used; the runner signs a new one for each attempt.
        self.remember(checked.signature, checked.signed_at + expect.max_age, now)?;
        let _slot = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| AwsError::Busy(self.config.max_concurrent))?;
        let timeout = self.config.sts_timeout();
        let answer = {
            let _counted = InFlight::new(&self.metrics.in_flight);
            tokio::time::timeout(timeout, self.call_sts(&request)).await
        };
        let xml = answer.map_err(|_| AwsError::Timeout(timeout))??;
        let identity = identity::parse_response(&xml)?;
        let claims = identity.claims(&self.config.issuer)?;
        Ok(ValidatedToken {
            issuer: self.config.issuer.clone(),
            subject: identity.arn,
            expires_at: now + IDENTITY_LIFETIME,
            claims,
        })
    }

    /// Marks a signature used until `until`; refuses one already used.
    fn remember(
        &self,
        signature: String,
        until: SystemTime,
        now: SystemTime,
    ) -> Result<(), AwsError> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains_key(&signature) {
            return Err(AwsError::Replayed);
        }
        if seen.len() >= self.config.max_remembered {
            seen.retain(|_, until| *until >= now);
        }
        let result = if seen.len() >= self.config.max_remembered {
            Err(AwsError::TooManyRemembered(self.config.max_remembered))
        } else {
            seen.insert(signature, until);
            Ok(())
        };
        self.metrics
            .remembered
            .set(i64::try_from(seen.len()).unwrap_or(i64::MAX));
        result
    }

    /// Sends the signed request, as signed, to the configured endpoint.
    async fn call_sts(&self, request: &SignedRequest) -> Result<String, AwsError> {
        let unreachable = |e: reqwest::Error| AwsError::Unreachable {
            endpoint: self.endpoint.to_string(),
            detail: super::jwks::error_chain(&e),
        };
        let mut http = self.client.post(self.endpoint.clone());
        for (name, value) in &request.headers {
            // Framing is the HTTP client's business, not the signer's.
            if !matches!(
                name.to_ascii_lowercase().as_str(),
                "content-length"
                    | "connection"
                    | "transfer-encoding"
                    | "keep-alive"
                    | "te"
                    | "upgrade"
            ) {
                http = http.header(name.as_str(), value.as_str());
            }
        }
        let mut resp = http
            .body(request.body.clone())
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(AwsError::StsFailed { status });
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        match status {
            200 => Ok(text),
            400..=499 => Err(AwsError::Refused {
                status,
                detail: identity::parse_error(&text)
                    .unwrap_or_else(|| "no STS error document".into()),
            }),
            _ => Err(AwsError::StsFailed { status }),
        }
    }
}

#[cfg(test)]
#[path = "verifier_tests.rs"]
mod tests;
