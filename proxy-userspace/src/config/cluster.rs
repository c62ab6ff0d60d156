//! `[cluster]`: a fleet of bastions sharing grants and revocations through
//! etcd. Without it, grants stay in this agent (the single-bastion default).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::validate::FieldError;

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// etcd client URLs (`http://` or `https://`), one per member.
    pub etcd: Vec<String>,
    /// This bastion's name: in audit lines, metrics and the fleet's grants.
    pub name: String,
    /// Key prefix of the fleet's records; every bastion of one fleet uses
    /// the same.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// PEM CA certificate that signed the etcd members' certificates.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for etcd's `--client-cert-auth`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Bound on each etcd request; a grant that etcd has not stored within
    /// it is refused (503).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

pub const DEFAULT_PREFIX: &str = "/tcpgate/";

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

/// Longest `name`: it goes into every audit line and grant record.
const MAX_NAME: usize = 64;

impl ClusterSection {
    /// Whether the members are reached over TLS.
    #[must_use]
    pub fn uses_tls(&self) -> bool {
        self.etcd.iter().any(|u| u.starts_with("https://"))
    }

    pub(super) fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.etcd.is_empty() {
            errors.push(FieldError::new(
                "cluster.etcd",
                "list at least one etcd client URL, e.g. \"https://10.0.0.5:2379\"",
            ));
        }
        for (i, url) in self.etcd.iter().enumerate() {
            let field = format!("cluster.etcd[{i}]");
            let Some(rest) = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"))
            else {
                errors.push(FieldError::new(
                    field,
                    format!("{url:?} must start with http:// or https://"),
                ));
                continue;
            };
            if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                errors.push(FieldError::new(
                    field,
                    format!("{url:?} must be scheme://host:port, without a path"),
                ));
            }
        }
        let schemes: std::collections::HashSet<bool> = self
            .etcd
            .iter()
            .map(|u| u.starts_with("https://"))
            .collect();
        if schemes.len() > 1 {
            errors.push(FieldError::new(
                "cluster.etcd",
                "mixes http:// and https:// URLs; use one scheme for every member",
            ));
        }
        let name_ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if self.name.is_empty() || self.name.len() > MAX_NAME || !self.name.chars().all(name_ok) {
            errors.push(FieldError::new(
                "cluster.name",
                format!("must be 1 to {MAX_NAME} characters of A-Z a-z 0-9 - _ ."),
            ));
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') || self.prefix.len() < 2 {
            errors.push(FieldError::new(
                "cluster.prefix",
                format!(
                    "{:?} must start and end with '/', e.g. {DEFAULT_PREFIX:?}",
                    self.prefix
                ),
            ));
        }
        if self.timeout.is_zero() {
            errors.push(FieldError::new(
                "cluster.timeout",
                "must be greater than zero",
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            errors.push(FieldError::new(
                if self.cert.is_some() {
                    "cluster.key"
                } else {
                    "cluster.cert"
                },
                "cluster.cert and cluster.key go together",
            ));
        }
        let tls_files = [
            ("cluster.ca", &self.ca),
            ("cluster.cert", &self.cert),
            ("cluster.key", &self.key),
        ];
        for (field, path) in tls_files {
            let Some(path) = path else { continue };
            if !self.uses_tls() {
                errors.push(FieldError::new(
                    field,
                    "TLS files need https:// URLs in cluster.etcd",
                ));
            } else if !path.is_absolute() {
                errors.push(FieldError::new(field, "must be an absolute path"));
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> ClusterSection {
        toml::from_str(toml_text).expect("parses")
    }

    fn fields(s: &ClusterSection) -> Vec<String> {
        s.validate().into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn a_plain_section_takes_the_defaults() {
        let s = section("etcd = [\"http://127.0.0.1:2379\"]\nname = \"bastion-a\"");
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        assert_eq!(s.prefix, "/tcpgate/");
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert!(!s.uses_tls());
    }

    #[test]
    fn each_bad_field_is_named() {
        let s = section(
            "etcd = [\"10.0.0.5:2379\", \"http://a:1/x\"]\nname = \"bad name\"\nprefix = \"tcpgate\"\n\
             timeout = \"0s\"\ncert = \"/c.pem\"",
        );
        assert_eq!(
            fields(&s),
            [
                "cluster.etcd[0]",
                "cluster.etcd[1]",
                "cluster.name",
                "cluster.prefix",
                "cluster.timeout",
                "cluster.key",
                "cluster.cert",
            ]
        );
        let s = section("etcd = []\nname = \"a\"");
        assert_eq!(fields(&s), ["cluster.etcd"]);
        let s = section(
            "etcd = [\"https://a:2379\", \"http://b:2379\"]\nname = \"a\"\nca = \"relative.pem\"",
        );
        assert_eq!(fields(&s), ["cluster.etcd", "cluster.ca"]);
    }
}
