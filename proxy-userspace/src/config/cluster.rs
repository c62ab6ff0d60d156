//! `[cluster]`: a fleet of bastions sharing grants and revocations through
//! etcd. Without it, grants stay in this agent (the single-bastion default).

use std::time::Duration;

use serde::Deserialize;

use super::validate::FieldError;

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// etcd client URLs (`http://`), one per member. TLS to etcd is not
    /// supported yet: keep the etcd links on a private network.
    pub etcd: Vec<String>,
    /// This bastion's name: in audit lines, metrics and the fleet's grants.
    pub name: String,
    /// Key prefix of the fleet's records; every bastion of one fleet uses
    /// the same.
    #[serde(default = "default_prefix")]
    pub prefix: String,
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
    pub(super) fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.etcd.is_empty() {
            errors.push(FieldError::new(
                "cluster.etcd",
                "list at least one etcd client URL, e.g. \"http://10.0.0.5:2379\"",
            ));
        }
        for (i, url) in self.etcd.iter().enumerate() {
            let field = format!("cluster.etcd[{i}]");
            let Some(rest) = url.strip_prefix("http://") else {
                let why = if url.starts_with("https://") {
                    "https:// is not supported yet (etcd-client without TLS); use http:// on a private network"
                } else {
                    "must start with http://"
                };
                errors.push(FieldError::new(field, format!("{url:?}: {why}")));
                continue;
            };
            if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                errors.push(FieldError::new(
                    field,
                    format!("{url:?} must be scheme://host:port, without a path"),
                ));
            }
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
    }

    #[test]
    fn each_bad_field_is_named() {
        let s = section(
            "etcd = [\"10.0.0.5:2379\", \"http://a:1/x\", \"https://b:2379\"]
name = \"bad name\"
\
             prefix = \"tcpgate\"
timeout = \"0s\"",
        );
        assert_eq!(
            fields(&s),
            [
                "cluster.etcd[0]",
                "cluster.etcd[1]",
                "cluster.etcd[2]",
                "cluster.name",
                "cluster.prefix",
                "cluster.timeout",
            ]
        );
        let s = section("etcd = []\nname = \"a\"");
        assert_eq!(fields(&s), ["cluster.etcd"]);
    }
}
