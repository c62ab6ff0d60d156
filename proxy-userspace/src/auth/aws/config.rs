//! The `[auth.aws]` section: AWS IAM identities proven the way Vault's
//! `aws` auth method proves them (a signed STS `GetCallerIdentity`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::config::{DurationSpec, FieldError};

pub const DEFAULT_ISSUER: &str = "aws";
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
pub const DEFAULT_STS_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
pub const DEFAULT_MAX_REMEMBERED: usize = 65_536;
const MAX_REMEMBERED_LIMIT: usize = 1 << 20;
/// Above it, a flood of signed requests would only queue on STS's own
/// rate limits.
const MAX_CONCURRENT_LIMIT: usize = 1024;

fn default_issuer() -> String {
    DEFAULT_ISSUER.to_owned()
}
fn default_max_age() -> DurationSpec {
    DurationSpec::from_duration(DEFAULT_MAX_AGE)
}
fn default_timeout() -> DurationSpec {
    DurationSpec::from_duration(DEFAULT_STS_TIMEOUT)
}
fn default_max_concurrent() -> usize {
    DEFAULT_MAX_CONCURRENT
}
fn default_max_remembered() -> usize {
    DEFAULT_MAX_REMEMBERED
}

/// `[auth.aws]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// The name `[[policy]]` rules give as `issuer`, and the identities'
    /// `iss` claim.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Where signed requests are sent, e.g.
    /// `https://sts.eu-west-1.amazonaws.com/`. Never the URL in a request.
    pub sts_endpoint: String,
    /// This bastion's name: requests must carry it, signed, in
    /// `X-Tcpgate-Server-Id`, so one signed for another bastion (or
    /// another Vault) is refused here.
    pub server_id: String,
    /// When set, the region the requests must be signed for (the
    /// credential scope's), e.g. `eu-west-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// How old (or how far ahead) a request's `X-Amz-Date` may be: the
    /// replay bound.
    #[serde(default = "default_max_age")]
    pub max_age: DurationSpec,
    /// How long one STS call may take before the request is denied.
    #[serde(default = "default_timeout")]
    pub sts_timeout: DurationSpec,
    /// STS calls in flight at once; more are denied at once (`sts_busy`).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Signed requests remembered (until they age out of `max_age`) so
    /// that each is used once; when full, new ones are denied (`sts_busy`).
    #[serde(default = "default_max_remembered")]
    pub max_remembered: usize,
    /// Extra CA certificate (PEM) trusted for `sts_endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl AwsConfig {
    pub fn max_age(&self) -> Duration {
        self.max_age.get().unwrap_or(DEFAULT_MAX_AGE)
    }

    pub fn sts_timeout(&self) -> Duration {
        self.sts_timeout.get().unwrap_or(DEFAULT_STS_TIMEOUT)
    }

    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        const P: &str = "auth.aws";
        if self.issuer.trim().is_empty() {
            errors.push(FieldError::new(format!("{P}.issuer"), "must not be empty"));
        }
        match reqwest::Url::parse(&self.sts_endpoint) {
            Err(e) => errors.push(FieldError::new(
                format!("{P}.sts_endpoint"),
                format!("not a URL: {e}"),
            )),
            Ok(u) if !matches!(u.scheme(), "https" | "http") => errors.push(FieldError::new(
                format!("{P}.sts_endpoint"),
                "must be an https URL (http only for a local test STS)",
            )),
            Ok(u) if u.path() != "/" || u.query().is_some() => errors.push(FieldError::new(
                format!("{P}.sts_endpoint"),
                "must be the endpoint's root, e.g. https://sts.eu-west-1.amazonaws.com/",
            )),
            Ok(_) => {}
        }
        let id = self.server_id.trim();
        if id.is_empty() || id != self.server_id || id.chars().any(char::is_control) {
            errors.push(FieldError::new(
                format!("{P}.server_id"),
                "must be a non-empty name without surrounding spaces or control characters",
            ));
        }
        if let Some(region) = &self.region
            && region.trim().is_empty()
        {
            errors.push(FieldError::new(format!("{P}.region"), "must not be empty"));
        }
        self.max_age.check(format!("{P}.max_age"), false, errors);
        self.sts_timeout
            .check(format!("{P}.sts_timeout"), false, errors);
        if !(1..=MAX_REMEMBERED_LIMIT).contains(&self.max_remembered) {
            errors.push(FieldError::new(
                format!("{P}.max_remembered"),
                format!("must be 1 to {MAX_REMEMBERED_LIMIT}"),
            ));
        }
        if !(1..=MAX_CONCURRENT_LIMIT).contains(&self.max_concurrent) {
            errors.push(FieldError::new(
                format!("{P}.max_concurrent"),
                format!("must be 1 to {MAX_CONCURRENT_LIMIT}"),
            ));
        }
    }
}
