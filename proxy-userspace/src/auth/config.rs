//! Serde types for the `[auth]`, `[[auth.issuer]]` and `[[policy]]` sections.
//!
//! Values that users often get wrong (durations, prefixes, ports, matchers)
//! are kept in their raw form at deserialization so that [`validate_all`] can
//! report every bad field at once, each with its path, instead of stopping at
//! the first one.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::destination::DestinationSpec;

pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
pub const DEFAULT_PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(600);
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Shortest HS256 secret accepted: RFC 7518 §3.2 asks for a key at least as
/// long as the hash output (256 bits), or it can be brute-forced offline
/// from any one token.
pub const MIN_HS256_SECRET_LEN: usize = 32;

pub use crate::field_error::FieldError;

/// A humantime duration (`"30s"`, `"15m"`) kept with its source text; an
/// unparsable value is reported by validation, not by the TOML parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationSpec {
    raw: String,
    parsed: Option<Duration>,
}

impl DurationSpec {
    pub fn new(raw: &str) -> Self {
        DurationSpec {
            raw: raw.to_owned(),
            parsed: humantime::parse_duration(raw.trim()).ok(),
        }
    }

    pub fn from_duration(d: Duration) -> Self {
        DurationSpec {
            raw: humantime::format_duration(d).to_string(),
            parsed: Some(d),
        }
    }

    /// The parsed value; `None` only for configs that failed validation.
    pub fn get(&self) -> Option<Duration> {
        self.parsed
    }

    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Checks the value parses and, with `allow_zero == false`, is positive.
    pub(crate) fn check(&self, path: String, allow_zero: bool, errors: &mut Vec<FieldError>) {
        match self.parsed {
            None => errors.push(FieldError::new(
                path,
                format!(
                    "`{}` is not a duration (examples: \"30s\", \"15m\", \"1h\")",
                    self.raw
                ),
            )),
            Some(d) if d.is_zero() && !allow_zero => {
                errors.push(FieldError::new(path, "must be greater than zero"))
            }
            Some(_) => {}
        }
    }
}

impl Serialize for DurationSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|raw| DurationSpec::new(&raw))
    }
}

/// The top-level `auth` key: an `[auth]` table, or `auth = "none"`, which
/// says on purpose that every connection is admitted without a token.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthSetting {
    None,
    /// Boxed: the table is large, and the setting lives only while the
    /// file is read.
    Tokens(Box<AuthConfig>),
}

impl<'de> Deserialize<'de> for AuthSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = AuthSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an [auth] table, or the string \"none\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AuthSetting, E> {
                if v == "none" {
                    Ok(AuthSetting::None)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<AuthSetting, A::Error> {
                // Through the table's own derive, so its errors keep naming
                // the misspelt or mistyped field.
                AuthConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|auth| AuthSetting::Tokens(Box::new(auth)))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The `[auth]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Clock skew tolerated on `exp` and `nbf`. Zero is allowed.
    #[serde(default = "default_leeway")]
    pub leeway: DurationSpec,
    /// Deadline to receive the whole preamble of a connection.
    #[serde(default = "default_preamble_timeout")]
    pub preamble_timeout: DurationSpec,
    /// Claims copied from the token into grants and audit lines.
    #[serde(default)]
    pub audit_claims: Vec<String>,
    #[serde(default, rename = "issuer")]
    pub issuers: Vec<IssuerConfig>,
    /// `[auth.limits]`: bounds before and after authentication.
    #[serde(default)]
    pub limits: super::limits::AuthLimits,
    /// `[auth.aws]`: AWS IAM identities (signed STS requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<super::aws::AwsConfig>,
}

fn default_leeway() -> DurationSpec {
    DurationSpec::from_duration(DEFAULT_LEEWAY)
}
fn default_preamble_timeout() -> DurationSpec {
    DurationSpec::from_duration(DEFAULT_PREAMBLE_TIMEOUT)
}
fn default_refresh_interval() -> DurationSpec {
    DurationSpec::from_duration(DEFAULT_REFRESH_INTERVAL)
}
fn default_min_refresh_interval() -> DurationSpec {
    DurationSpec::from_duration(DEFAULT_MIN_REFRESH_INTERVAL)
}

/// One `[[auth.issuer]]`: a token issuer and where its keys come from:
/// `jwks_url`, `jwks_file`, or with neither, OIDC discovery from `issuer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Must equal the tokens' `iss` claim exactly.
    pub issuer: String,
    /// Must be one of the tokens' `aud` values.
    pub audience: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for `jwks_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_refresh_interval")]
    pub refresh_interval: DurationSpec,
    /// Lower bound between two refreshes triggered by unknown `kid`s.
    #[serde(default = "default_min_refresh_interval")]
    pub min_refresh_interval: DurationSpec,
    /// Development only: enables HS256 with this shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_file: Option<PathBuf>,
}

/// A claim matcher as written in a rule's `match` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MatcherSpec {
    /// Matches the JSON boolean or the string "true"/"false".
    Bool(bool),
    /// Matches the JSON number or its decimal string.
    Integer(i64),
    /// Exact string, or a glob when it contains `*` or `?`.
    Text(String),
    /// Any of the alternatives (each exact or glob).
    List(Vec<String>),
    /// One operator that says how to match: `equals`, `glob`, `one_of`,
    /// `contains` (see [`super::matcher`]).
    Table(serde_json::Map<String, serde_json::Value>),
    /// Anything else; always rejected by validation with a clear message.
    Unsupported(serde_json::Value),
}

/// One `[[policy]]` rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// The issuer whose tokens this rule admits. Required (validation says
    /// so by field path): a rule without one would match every issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    pub max_lifetime: DurationSpec,
    /// Claim path (`ref`, `"kubernetes.io.namespace"`) → matcher.
    #[serde(default, rename = "match")]
    pub claims: BTreeMap<String, MatcherSpec>,
    pub allow: Vec<DestinationSpec>,
}

impl RuleConfig {
    /// `policy[1] (deploy-db)`: the prefix of this rule's field paths.
    pub fn path(&self, index: usize) -> String {
        if self.name.trim().is_empty() {
            format!("policy[{index}]")
        } else {
            format!("policy[{index}] ({})", self.name)
        }
    }
}

impl AuthConfig {
    /// Whether `name` is a configured issuer: an `[[auth.issuer]]`, or
    /// `[auth.aws]`'s `issuer`.
    #[must_use]
    pub fn has_issuer(&self, name: &str) -> bool {
        self.issuers.iter().any(|i| i.issuer == name)
            || self.aws.as_ref().is_some_and(|a| a.issuer == name)
    }

    pub fn leeway(&self) -> Duration {
        self.leeway.get().unwrap_or(DEFAULT_LEEWAY)
    }

    pub fn preamble_timeout(&self) -> Duration {
        self.preamble_timeout
            .get()
            .unwrap_or(DEFAULT_PREAMBLE_TIMEOUT)
    }

    /// Checks the `[auth]` section alone; see [`validate_all`] for rules too.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.leeway.check("auth.leeway".into(), true, &mut errors);
        self.preamble_timeout
            .check("auth.preamble_timeout".into(), false, &mut errors);
        self.limits.validate(&mut errors);
        for (i, claim) in self.audit_claims.iter().enumerate() {
            if claim.trim().is_empty() {
                errors.push(FieldError::new(
                    format!("auth.audit_claims[{i}]"),
                    "must not be empty",
                ));
            }
        }
        if self.issuers.is_empty() && self.aws.is_none() {
            errors.push(FieldError::new(
                "auth.issuer",
                "at least one [[auth.issuer]] (or an [auth.aws] section) must be configured",
            ));
        }
        if let Some(aws) = &self.aws {
            aws.validate(&mut errors);
            if self.issuers.iter().any(|i| i.issuer == aws.issuer) {
                errors.push(FieldError::new(
                    "auth.aws.issuer",
                    format!(
                        "`{}` is also an [[auth.issuer]]; give [auth.aws] another name",
                        aws.issuer
                    ),
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, issuer) in self.issuers.iter().enumerate() {
            issuer.validate(&format!("auth.issuer[{i}]"), &mut errors);
            if !issuer.issuer.is_empty() && !seen.insert(issuer.issuer.as_str()) {
                errors.push(FieldError::new(
                    format!("auth.issuer[{i}].issuer"),
                    format!("issuer `{}` is configured twice", issuer.issuer),
                ));
            }
        }
        errors
    }
}

impl IssuerConfig {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.issuer.trim().is_empty() {
            errors.push(FieldError::new(
                format!("{path}.issuer"),
                "must not be empty",
            ));
        }
        if self.audience.trim().is_empty() {
            errors.push(FieldError::new(
                format!("{path}.audience"),
                "must not be empty",
            ));
        }
        match (&self.jwks_url, &self.jwks_file, &self.hs256_secret_file) {
            (Some(_), Some(_), _) => errors.push(FieldError::new(
                format!("{path}.jwks_url"),
                "set exactly one of jwks_url and jwks_file, not both",
            )),
            // Neither: OIDC discovery from the issuer URL.
            (None, None, None) => match reqwest::Url::parse(&self.issuer) {
                Ok(u) if u.scheme() == "https" => {}
                _ => errors.push(FieldError::new(
                    format!("{path}.issuer"),
                    "without jwks_url or jwks_file the issuer must be an https URL, \
                     whose /.well-known/openid-configuration names the keys",
                )),
            },
            // A shared secret beside published keys lets anyone who learns
            // the (weaker, development) secret mint tokens for a real issuer.
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => errors.push(FieldError::new(
                format!("{path}.hs256_secret_file"),
                "must not be set together with jwks_url or jwks_file: use a separate \
                 development issuer for HS256",
            )),
            (None, None, Some(secret)) => {
                if let Err(e) = read_hs256_secret(secret) {
                    errors.push(FieldError::new(
                        format!("{path}.hs256_secret_file"),
                        crate::error_chain(&e),
                    ));
                }
            }
            _ => {}
        }
        if let Some(url) = &self.jwks_url {
            match reqwest::Url::parse(url) {
                Err(e) => errors.push(FieldError::new(
                    format!("{path}.jwks_url"),
                    format!("not a URL: {e}"),
                )),
                Ok(u) if u.scheme() != "https" => {
                    errors.push(FieldError::new(format!("{path}.jwks_url"), "must be https"))
                }
                Ok(_) => {}
            }
        }
        if self.ca_file.is_some() && (self.jwks_file.is_some() || self.hs256_secret_file.is_some())
        {
            errors.push(FieldError::new(
                format!("{path}.ca_file"),
                "only applies with jwks_url or OIDC discovery",
            ));
        }
        self.refresh_interval
            .check(format!("{path}.refresh_interval"), false, errors);
        self.min_refresh_interval
            .check(format!("{path}.min_refresh_interval"), false, errors);
    }
}

/// Why an HS256 secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} holds {len} byte(s) after trimming whitespace; HS256 needs at least \
         {MIN_HS256_SECRET_LEN} (e.g. `openssl rand -base64 48 > {path}`)"
    )]
    TooShort { path: String, len: usize },
}

/// Reads an HS256 secret: the file's bytes without surrounding whitespace,
/// at least [`MIN_HS256_SECRET_LEN`] of them.
pub fn read_hs256_secret(path: &std::path::Path) -> Result<Vec<u8>, SecretError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
        path: shown.clone(),
        source,
    })?;
    let trimmed = bytes.trim_ascii();
    if trimmed.len() < MIN_HS256_SECRET_LEN {
        return Err(SecretError::TooShort {
            path: shown,
            len: trimmed.len(),
        });
    }
    Ok(trimmed.to_vec())
}

/// Validates `[auth]` and `[[policy]]` together (rules name issuers), and
/// returns every problem found.
pub fn validate_all(auth: &AuthConfig, policy: &[RuleConfig]) -> Vec<FieldError> {
    let mut errors = auth.validate();
    if let Err(rule_errors) = super::policy::Policy::from_config(policy, auth) {
        errors.extend(rule_errors);
    }
    errors
}
