//! `[api]` and `[admin]`: the agent's two HTTP servers, and the bounds both
//! put on what a peer can hold before (or without) authenticating.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::validate::FieldError;

/// Default path of the operator socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tcpgate/admin.sock";

/// `[api]`: the runner-facing grant API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// One address, or a list (e.g. an IPv4 and an IPv6 address, so a
    /// dual-stack runner can get a grant for each family).
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// PEM certificate chain (leaf first). Required with `tls_key` unless
    /// `insecure_http` is set.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP: bearer tokens cross the network in clear text.
    /// For development only.
    #[serde(default)]
    pub insecure_http: bool,
    #[serde(default)]
    pub limits: HttpLimits,
}

/// `[admin]`: `/healthz`, `/readyz`, `/metrics`, and the operator endpoints
/// (list, revoke). On a Unix socket by default; a TCP `listen` needs a
/// bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Unix socket, mode 0660, group `[agent] operator_group`. Default
    /// /run/tcpgate/admin.sock when `listen` is not set.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Also (or instead) serve on TCP; every endpoint but `/healthz` and
    /// `/readyz` then needs `Authorization: Bearer <token_file contents>`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token for `listen` (at least 32 bytes).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub limits: HttpLimits,
}

impl AdminSection {
    /// The Unix socket to serve, if any.
    #[must_use]
    pub fn socket_path(&self) -> Option<PathBuf> {
        match (&self.socket, self.listen) {
            (Some(path), _) => Some(path.clone()),
            (None, None) => Some(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            (None, Some(_)) => None,
        }
    }
}

/// `[api.limits]` / `[admin.limits]`: what one peer may hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// A request's head (and the TLS handshake) must arrive within this,
    /// counted from when the connection is ready for a request: slowloris
    /// clients and silent connections are closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection that moves no byte either way for this long (a body
    /// that stops arriving, a reader that stops reading) is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest request body, in bytes; larger ones get 413 unread.
    pub max_body: usize,
    /// Largest request head (request line and headers) one connection may
    /// have buffered, in bytes (at least 8192); more gets 431 and a close.
    pub max_header_bytes: usize,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_body: 64 * 1024,
            max_header_bytes: 16 * 1024,
            max_connections: 256,
        }
    }
}

impl HttpLimits {
    fn check(&self, path: &str, errors: &mut Vec<FieldError>) {
        for (name, value) in [
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                errors.push(FieldError::new(
                    format!("{path}.{name}"),
                    "must be greater than zero",
                ));
            }
        }
        if !(1..=16 << 20).contains(&self.max_body) {
            errors.push(FieldError::new(
                format!("{path}.max_body"),
                "must be between 1 and 16777216 bytes",
            ));
        }
        if !(8192..=1 << 20).contains(&self.max_header_bytes) {
            errors.push(FieldError::new(
                format!("{path}.max_header_bytes"),
                "must be between 8192 and 1048576 bytes",
            ));
        }
        if !(1..=65536).contains(&self.max_connections) {
            errors.push(FieldError::new(
                format!("{path}.max_connections"),
                "must be between 1 and 65536",
            ));
        }
    }
}

impl ApiSection {
    pub(super) fn check(&self, errors: &mut Vec<FieldError>) {
        if self.listen.is_empty() {
            errors.push(FieldError::new("api.listen", "needs at least one address"));
        }
        let mut seen = std::collections::HashSet::new();
        for addr in &self.listen {
            if !seen.insert(addr) {
                errors.push(FieldError::new(
                    "api.listen",
                    format!("{addr} is listed twice"),
                ));
            }
        }
        match (&self.tls_cert, &self.tls_key, self.insecure_http) {
            (Some(_), Some(_), false) => {}
            (Some(_), Some(_), true) => errors.push(FieldError::new(
                "api.insecure_http",
                "contradicts tls_cert/tls_key: remove one or the other",
            )),
            (None, None, true) => {}
            (None, None, false) => errors.push(FieldError::new(
                "api.tls_cert",
                "the grant API receives bearer tokens: give tls_cert and tls_key (PEM), \
                 or set insecure_http = true for development only",
            )),
            (Some(_), None, _) | (None, Some(_), _) => errors.push(FieldError::new(
                "api.tls_key",
                "tls_cert and tls_key go together",
            )),
        }
        self.limits.check("api.limits", errors);
    }
}

impl AdminSection {
    pub(super) fn check(&self, errors: &mut Vec<FieldError>) {
        match (self.listen, &self.token_file) {
            (Some(_), None) => errors.push(FieldError::new(
                "admin.token_file",
                "a TCP admin listener needs a bearer token: give token_file, \
                 or use the Unix socket (admin.socket) instead of listen",
            )),
            (None, Some(_)) => errors.push(FieldError::new(
                "admin.token_file",
                "only used with admin.listen (the Unix socket is guarded by its mode)",
            )),
            _ => {}
        }
        if let Some(path) = &self.socket
            && !path.is_absolute()
        {
            errors.push(FieldError::new("admin.socket", "must be an absolute path"));
        }
        self.limits.check("admin.limits", errors);
    }
}

/// `"addr"` or `["addr", ...]`.
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(
        untagged,
        expecting = "an address like \"198.51.100.1:8443\" or a list of them"
    )]
    enum OneOrMany {
        One(SocketAddr),
        Many(Vec<SocketAddr>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(addr) => vec![addr],
        OneOrMany::Many(addrs) => addrs,
    })
}
