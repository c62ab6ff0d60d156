//! Reaching the agent's operator endpoints: the Unix socket by default, or
//! TCP with a bearer token read from a file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::DEFAULT_ADMIN_SOCKET;

/// Where the agent's operator endpoints are.
#[derive(Debug, clap::Args)]
pub struct AdminArg {
    /// Operator endpoint: a Unix socket path (or `unix:PATH`), or
    /// `http://HOST:PORT`. Default: `[admin]` from the configuration file
    /// (its socket, else its listen address), else /run/tcpgate/admin.sock.
    #[arg(long, value_name = "SOCKET|URL", env = "TCPGATE_ADMIN")]
    pub admin: Option<String>,
    /// File holding the bearer token of a TCP endpoint. Default:
    /// `[admin] token_file` from the configuration file.
    #[arg(long, value_name = "FILE", env = "TCPGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Configuration file to read `[admin]` from.
    #[arg(long, short, default_value = crate::config::DEFAULT_CONFIG_PATH, env = "TCPGATE_CONFIG")]
    pub config: PathBuf,
}

/// A resolved operator endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminEndpoint {
    Socket(PathBuf),
    Http {
        url: String,
        token_file: Option<PathBuf>,
    },
}

impl std::fmt::Display for AdminEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminEndpoint::Socket(path) => write!(f, "unix:{}", path.display()),
            AdminEndpoint::Http { url, .. } => f.write_str(url),
        }
    }
}

/// An `--admin` value that is neither a socket path nor a URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--admin {0:?}: expected a socket path (/run/tcpgate/admin.sock) or http://HOST:PORT")]
pub struct BadEndpoint(String);

/// Why the operator endpoint cannot be named or reached.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    BadEndpoint(#[from] BadEndpoint),
    #[error("cannot read the admin token file {}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(reqwest::Error),
}

impl AdminArg {
    /// The endpoint these flags and the configuration file name.
    pub fn endpoint(&self) -> Result<AdminEndpoint, AdminError> {
        let config = if self.admin.is_none() && self.config.exists() {
            crate::config::Config::load(&self.config)?.admin
        } else {
            None
        };
        let mut endpoint = match (&self.admin, config) {
            (Some(given), _) => parse(given)?,
            (None, Some(admin)) => match (admin.socket_path(), admin.listen) {
                (Some(path), _) => AdminEndpoint::Socket(path),
                (None, Some(addr)) => AdminEndpoint::Http {
                    url: format!("http://{addr}"),
                    token_file: admin.token_file,
                },
                (None, None) => AdminEndpoint::Socket(DEFAULT_ADMIN_SOCKET.into()),
            },
            (None, None) => AdminEndpoint::Socket(DEFAULT_ADMIN_SOCKET.into()),
        };
        if let (AdminEndpoint::Http { token_file, .. }, Some(file)) =
            (&mut endpoint, &self.admin_token_file)
        {
            *token_file = Some(file.clone());
        }
        Ok(endpoint)
    }
}

fn parse(given: &str) -> Result<AdminEndpoint, BadEndpoint> {
    if given.starts_with("http://") || given.starts_with("https://") {
        return Ok(AdminEndpoint::Http {
            url: given.trim_end_matches('/').to_owned(),
            token_file: None,
        });
    }
    let path = given.strip_prefix("unix:").unwrap_or(given);
    if Path::new(path).is_absolute() || path.starts_with('.') {
        return Ok(AdminEndpoint::Socket(path.into()));
    }
    Err(BadEndpoint(given.to_owned()))
}

/// An HTTP client bound to the operator endpoint.
pub struct AdminClient {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl AdminEndpoint {
    /// A client with `timeout` per request; reads the token file.
    pub fn client(&self, timeout: Duration) -> Result<AdminClient, AdminError> {
        let builder = reqwest::Client::builder().timeout(timeout);
        let (builder, base, token) = match self {
            // The host part is ignored on a socket; it only fills the URL.
            AdminEndpoint::Socket(path) => (
                builder.unix_socket(path.as_path()),
                "http://tcpgate".to_owned(),
                None,
            ),
            AdminEndpoint::Http { url, token_file } => {
                let token = match token_file {
                    Some(file) => Some(
                        std::fs::read_to_string(file)
                            .map_err(|source| AdminError::TokenFile {
                                path: file.clone(),
                                source,
                            })?
                            .trim()
                            .to_owned(),
                    ),
                    None => None,
                };
                (builder, url.clone(), token)
            }
        };
        Ok(AdminClient {
            client: builder.build().map_err(AdminError::Client)?,
            base,
            token,
        })
    }
}

impl AdminClient {
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.with_token(self.client.get(format!("{}{path}", self.base)))
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.with_token(self.client.delete(format!("{}{path}", self.base)))
    }

    fn with_token(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_flag_takes_a_socket_or_a_url() {
        assert_eq!(
            parse("/run/x.sock"),
            Ok(AdminEndpoint::Socket("/run/x.sock".into()))
        );
        assert_eq!(
            parse("unix:/run/x.sock"),
            Ok(AdminEndpoint::Socket("/run/x.sock".into()))
        );
        assert_eq!(
            parse("http://127.0.0.1:9470/"),
            Ok(AdminEndpoint::Http {
                url: "http://127.0.0.1:9470".into(),
                token_file: None
            })
        );
        assert!(parse("127.0.0.1:9470").is_err());
    }
}
