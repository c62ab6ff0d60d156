//! `[cluster]`: a fleet of bastions sharing grants and revocations through
//! etcd. Without it, grants stay in this agent (the single-bastion default).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::validate::FieldError;

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// etcd client URLs, one per member: `https://` with `ca` (and
    /// normally `cert` and `key`), or `http://` on a private network.
    pub etcd: Vec<String>,
    /// PEM CA certificate(s) that signed etcd's server certificates; makes
    /// the URLs `https://`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate this bastion shows etcd
    /// (`--client-cert-auth`); needs `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
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
        let (scheme, other) = if self.ca.is_some() {
            ("https://", "http://")
        } else {
            ("http://", "https://")
        };
        for (i, url) in self.etcd.iter().enumerate() {
            let field = format!("cluster.etcd[{i}]");
            let Some(rest) = url.strip_prefix(scheme) else {
                let why = match (url.starts_with(other), self.ca.is_some()) {
                    (true, true) => "cluster.ca is set: use https:// (TLS to every member)",
                    (true, false) => {
                        "https:// needs cluster.ca, the CA that signed etcd's certificates"
                    }
                    (false, _) => "must start with http:// or https://",
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
        errors.extend(self.validate_tls());
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

    /// `ca`, `cert` and `key`: given together as TLS needs them, and each
    /// file readable and of the right kind, so a typo fails at start
    /// rather than as a handshake error against etcd.
    fn validate_tls(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        match (&self.cert, &self.key) {
            (Some(_), None) => errors.push(FieldError::new(
                "cluster.key",
                "missing: cluster.cert needs the key it was issued for",
            )),
            (None, Some(_)) => errors.push(FieldError::new(
                "cluster.cert",
                "missing: cluster.key needs the certificate it belongs to",
            )),
            _ => {}
        }
        if self.ca.is_none() && self.cert.is_some() {
            errors.push(FieldError::new(
                "cluster.ca",
                "missing: a client certificate is for TLS, which needs cluster.ca and https:// URLs",
            ));
        }
        let files = [
            ("cluster.ca", &self.ca, PemKind::Certificates),
            ("cluster.cert", &self.cert, PemKind::Certificates),
            ("cluster.key", &self.key, PemKind::PrivateKey),
        ];
        for (field, path, kind) in files {
            if let Some(path) = path
                && let Err(why) = kind.check(path)
            {
                errors.push(FieldError::new(field, format!("{}: {why}", path.display())));
            }
        }
        errors
    }
}

/// What a PEM file named in `[cluster]` must hold.
#[derive(Debug, Clone, Copy)]
enum PemKind {
    Certificates,
    PrivateKey,
}

/// Why a PEM file named in `[cluster]` is unusable.
#[derive(Debug, thiserror::Error)]
enum PemError {
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("not PEM certificates: {0}")]
    Certificates(#[source] tokio_rustls::rustls::pki_types::pem::Error),
    #[error("holds no PEM certificate")]
    NoCertificate,
    #[error("not a PEM private key: {0}")]
    PrivateKey(#[source] tokio_rustls::rustls::pki_types::pem::Error),
}

impl PemKind {
    fn check(self, path: &Path) -> Result<(), PemError> {
        let text = std::fs::read(path).map_err(PemError::Read)?;
        match self {
            Self::Certificates => {
                let certs = CertificateDer::pem_slice_iter(&text)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(PemError::Certificates)?;
                if certs.is_empty() {
                    return Err(PemError::NoCertificate);
                }
            }
            Self::PrivateKey => {
                PrivateKeyDer::from_pem_slice(&text).map_err(PemError::PrivateKey)?;
            }
        }
        Ok(())
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

    fn tls_section(extra: &str, urls: &str) -> ClusterSection {
        section(&format!("etcd = [{urls}]\nname = \"a\"\n{extra}"))
    }

    #[test]
    fn tls_files_are_checked_and_given_together() {
        let k = tcpgate_tests::tokens::key_files();
        let (ca, cert, key) = (&k.ca_pem, &k.server_cert, &k.server_key);
        let https = "\"https://[2001:db8::5]:2379\"";
        let full = format!("ca = {ca:?}\ncert = {cert:?}\nkey = {key:?}");
        assert!(fields(&tls_section(&full, https)).is_empty());
        // Server-authenticated only (etcd without --client-cert-auth).
        assert!(fields(&tls_section(&format!("ca = {ca:?}"), https)).is_empty());
        // The scheme follows `ca`, both ways.
        assert_eq!(fields(&tls_section("", https)), ["cluster.etcd[0]"]);
        let http = "\"http://[2001:db8::5]:2379\"";
        assert_eq!(fields(&tls_section(&full, http)), ["cluster.etcd[0]"]);
        // Half a client identity names the missing half.
        let cert_only = format!("ca = {ca:?}\ncert = {cert:?}");
        assert_eq!(fields(&tls_section(&cert_only, https)), ["cluster.key"]);
        let key_only = format!("ca = {ca:?}\nkey = {key:?}");
        assert_eq!(fields(&tls_section(&key_only, https)), ["cluster.cert"]);
        let no_ca = format!("cert = {cert:?}\nkey = {key:?}");
        assert_eq!(fields(&tls_section(&no_ca, http)), ["cluster.ca"]);
    }

    #[test]
    fn an_unreadable_or_wrong_tls_file_is_named() {
        let k = tcpgate_tests::tokens::key_files();
        let https = "\"https://127.0.0.1:2379\"";
        let missing = "/nonexistent/etcd-ca.pem";
        let s = tls_section(&format!("ca = {missing:?}"), https);
        let errors = s.validate();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "cluster.ca");
        assert!(errors[0].to_string().contains(missing), "{}", errors[0]);
        // Certificate and key swapped: each field says what it lacks.
        let swapped = format!(
            "ca = {:?}\ncert = {:?}\nkey = {:?}",
            k.ca_pem, k.server_key, k.server_cert
        );
        let errors = tls_section(&swapped, https).validate();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            fields(&tls_section(&swapped, https)),
            ["cluster.cert", "cluster.key"],
            "{text:?}"
        );
        assert!(text[0].contains("no PEM certificate"), "{text:?}");
        assert!(text[1].contains("not a PEM private key"), "{text:?}");
    }
}
