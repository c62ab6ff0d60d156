//! `[auth.limits]`: bounds on what a peer can make the agent hold, before
//! and after authentication. Every bound has a default and a metric when
//! it is hit (`tcpgate_limit_hits{limit=...}`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::{DurationSpec, FieldError};
use super::preamble::{HEADER_LEN, MAX_PREAMBLE};

pub const DEFAULT_GRANT_FIRST_BYTES_WAIT: Duration = Duration::from_millis(25);
/// A JWT from a CI system is 1 to 3 KiB; the protocol allows 16 KiB.
pub const DEFAULT_MAX_PREAMBLE_BYTES: usize = 8 * 1024;
/// Smallest `max_preamble_bytes` accepted: below it no real JWT fits.
pub const MIN_PREAMBLE_BYTES: usize = 256;
pub const DEFAULT_PENDING_CONNECTIONS: usize = 2048;
/// Above the bench's 128 concurrent openings from one runner address.
pub const DEFAULT_PENDING_PER_SOURCE: usize = 256;
pub const DEFAULT_GRANTS_PER_SUBJECT: usize = 64;
pub const DEFAULT_GRANTS_PER_SOURCE: usize = 64;
pub const DEFAULT_MAX_GRANTS: usize = 4096;
/// Far above the tokens of the jobs one bastion serves at a time.
pub const DEFAULT_TOKEN_CACHE_ENTRIES: usize = 4096;

/// The `[auth.limits]` section; every field is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthLimits {
    /// With a source grant, how long to wait for the client's first bytes
    /// before admitting by the grant alone (server-speaks-first protocols
    /// send nothing). Bytes that start like a preamble are read as one.
    pub grant_first_bytes_wait: DurationSpec,
    /// Largest preamble accepted (header included), checked on the
    /// declared length before any buffer is allocated.
    pub max_preamble_bytes: usize,
    /// Accepted connections not yet admitted or refused, all sources
    /// together; over it the oldest is shed.
    pub pending_connections: usize,
    /// The same, per client address.
    pub pending_per_source: usize,
    /// Live source grants per token identity (issuer and subject).
    pub grants_per_subject: usize,
    /// Live source grants bound to one client address.
    pub grants_per_source: usize,
    /// Live source grants in total.
    pub max_grants: usize,
    /// Verified tokens remembered (by SHA-256, until their `exp`) so that
    /// a job's next connections skip the signature check; 0 turns the
    /// cache off. Only tokens that passed verification get in.
    pub token_cache_entries: usize,
}

impl Default for AuthLimits {
    fn default() -> Self {
        Self {
            grant_first_bytes_wait: DurationSpec::from_duration(DEFAULT_GRANT_FIRST_BYTES_WAIT),
            max_preamble_bytes: DEFAULT_MAX_PREAMBLE_BYTES,
            pending_connections: DEFAULT_PENDING_CONNECTIONS,
            pending_per_source: DEFAULT_PENDING_PER_SOURCE,
            grants_per_subject: DEFAULT_GRANTS_PER_SUBJECT,
            grants_per_source: DEFAULT_GRANTS_PER_SOURCE,
            max_grants: DEFAULT_MAX_GRANTS,
            token_cache_entries: DEFAULT_TOKEN_CACHE_ENTRIES,
        }
    }
}

/// Longest first-bytes wait accepted: it delays every server-first session.
const MAX_FIRST_BYTES_WAIT: Duration = Duration::from_secs(1);

impl AuthLimits {
    pub fn grant_first_bytes_wait(&self) -> Duration {
        self.grant_first_bytes_wait
            .get()
            .unwrap_or(DEFAULT_GRANT_FIRST_BYTES_WAIT)
    }

    /// The largest token accepted in a preamble.
    pub fn max_token_len(&self) -> usize {
        self.max_preamble_bytes.saturating_sub(HEADER_LEN)
    }

    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        const P: &str = "auth.limits";
        self.grant_first_bytes_wait
            .check(format!("{P}.grant_first_bytes_wait"), false, errors);
        if self
            .grant_first_bytes_wait
            .get()
            .is_some_and(|d| d > MAX_FIRST_BYTES_WAIT)
        {
            errors.push(FieldError::new(
                format!("{P}.grant_first_bytes_wait"),
                "must be at most 1s (it delays every server-first session)",
            ));
        }
        if !(MIN_PREAMBLE_BYTES..=MAX_PREAMBLE).contains(&self.max_preamble_bytes) {
            errors.push(FieldError::new(
                format!("{P}.max_preamble_bytes"),
                format!("must be {MIN_PREAMBLE_BYTES} to {MAX_PREAMBLE} bytes"),
            ));
        }
        for (name, value) in [
            ("pending_connections", self.pending_connections),
            ("pending_per_source", self.pending_per_source),
            ("grants_per_subject", self.grants_per_subject),
            ("grants_per_source", self.grants_per_source),
            ("max_grants", self.max_grants),
        ] {
            if value == 0 {
                errors.push(FieldError::new(format!("{P}.{name}"), "must be at least 1"));
            }
        }
        if self.pending_per_source > self.pending_connections {
            errors.push(FieldError::new(
                format!("{P}.pending_per_source"),
                "must not exceed pending_connections",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        let mut errors = Vec::new();
        AuthLimits::default().validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let bad: AuthLimits = toml::from_str(
            "grant_first_bytes_wait = \"5s\"\nmax_preamble_bytes = 20000\nmax_grants = 0\n\
             pending_connections = 4\npending_per_source = 8\n",
        )
        .expect("parse");
        let mut errors = Vec::new();
        bad.validate(&mut errors);
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for field in [
            "auth.limits.grant_first_bytes_wait",
            "auth.limits.max_preamble_bytes",
            "auth.limits.max_grants",
            "auth.limits.pending_per_source",
        ] {
            assert!(text.iter().any(|e| e.contains(field)), "{field}: {text:?}");
        }
        assert!(toml::from_str::<AuthLimits>("max_grant = 3").is_err());
        let off: AuthLimits = toml::from_str("token_cache_entries = 0").expect("parse");
        let mut errors = Vec::new();
        off.validate(&mut errors);
        assert!(errors.is_empty(), "0 turns the token cache off: {errors:?}");
    }
}
