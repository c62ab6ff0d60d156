//! Client-side helpers behind the CLI verbs: read a token, dial through the
//! agent with a preamble, or ask the grant API for a source-bound grant.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::api_types::{ApiError, GrantRequest, GrantResponse};
use super::destination::Destination;
use super::preamble::{PreambleError, Status, encode_preamble, read_response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read token file {path}")]
    ReadToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error(
        "token file {path} does not hold a JWT (expected three base64url parts separated by dots)"
    )]
    NotAJwt { path: PathBuf },
    #[error(
        "no token: give --token-file FILE or --token-env NAME (in a GitLab job, \
         {DEFAULT_TOKEN_ENV} is read by default)"
    )]
    NoToken,
    #[error(
        "no token: {name} is not set in this GitLab job; add to the job:\n  id_tokens:\n    \
         {name}:\n      aud: <audience>\n(the audience the bastion's [[auth.issuer]] expects)"
    )]
    NoGitlabToken { name: String },
    #[error("environment variable {name} is not set or empty")]
    EnvUnset { name: String },
    #[error(
        "environment variable {name} does not hold a JWT (expected three base64url parts separated by dots)"
    )]
    EnvNotAJwt { name: String },
    #[error("cannot connect to {target}")]
    Connect {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {timeout:?} connecting to {target}")]
    ConnectTimeout {
        target: SocketAddr,
        timeout: Duration,
    },
    #[error("cannot send the preamble to {target}")]
    Send {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no valid answer from the agent at {target}")]
    Answer {
        target: SocketAddr,
        #[source]
        source: PreambleError,
    },
    /// The bastion routed the connection (the runner holds a source grant
    /// and `[intercept.routed_grants]` is on) and refused the preamble
    /// before it reached the target.
    #[error(
        "{target} reset the connection before any answer; if this runner holds a source grant \
         on a bastion with routed grants, connect without a token (the grant admits it, see docs/routed.md)"
    )]
    ResetBeforeAnswer { target: SocketAddr },
    #[error("the token cannot be sent")]
    Token(#[source] PreambleError),
    #[error("access denied by the agent: {message}")]
    Denied { message: String },
    #[error("the agent failed: {message}")]
    Agent { message: String },
    #[error("cannot load the CA file")]
    Ca(#[source] super::trust::TrustError),
    #[error(
        "the grant API at {url} presented a certificate that {trusted} does not vouch for ({problem:?}){hint}"
    )]
    Untrusted {
        url: String,
        trusted: String,
        problem: tokio_rustls::rustls::CertificateError,
        hint: &'static str,
    },
    #[error("grant API URL {url:?} is not http(s)")]
    BadUrl { url: String },
    #[error("grant API request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("grant API refused ({status} {error}): {message}")]
    Api {
        status: u16,
        error: String,
        message: String,
    },
    #[error("grant API answered HTTP {status} with an unexpected body: {snippet}")]
    UnexpectedBody { status: u16, snippet: String },
    #[error(transparent)]
    Aws(#[from] super::aws::runner::AwsClientError),
}

impl ClientError {
    /// The agent's or API's reason code, when it gave one.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// The variable a GitLab job's `id_tokens:` entry is read from by default.
pub const DEFAULT_TOKEN_ENV: &str = "TCPGATE_TOKEN";

/// Where a client verb reads its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    Env(String),
    /// [`DEFAULT_TOKEN_ENV`], chosen because this runs in a GitLab job.
    GitlabDefault,
    /// A `GetCallerIdentity` signed afresh on each read (`--aws`).
    Aws(super::aws::runner::AwsSigning),
}

/// Whether the process runs in a GitLab CI job (GitLab sets both).
fn in_gitlab_job(env: &impl Fn(&str) -> Option<String>) -> bool {
    env("CI").as_deref() == Some("true") && env("GITLAB_CI").as_deref() == Some("true")
}

impl TokenSource {
    /// `--token-file` or `--token-env` as given (clap keeps them exclusive);
    /// with neither, [`DEFAULT_TOKEN_ENV`] inside a GitLab job.
    pub fn choose(
        file: Option<&Path>,
        env_name: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<TokenSource, ClientError> {
        match (file, env_name) {
            (Some(path), _) => Ok(TokenSource::File(path.to_owned())),
            (None, Some(name)) => Ok(TokenSource::Env(name.to_owned())),
            (None, None) if in_gitlab_job(&env) => Ok(TokenSource::GitlabDefault),
            (None, None) => Err(ClientError::NoToken),
        }
    }

    /// Reads the token now, from the process environment or the file.
    pub fn read(&self) -> Result<String, ClientError> {
        self.read_with(|name| std::env::var(name).ok())
    }

    /// Reads the token, looking variables up with `env`.
    pub fn read_with(&self, env: impl Fn(&str) -> Option<String>) -> Result<String, ClientError> {
        let (name, value) = match self {
            TokenSource::File(path) => return read_token_file(path),
            TokenSource::Aws(signing) => {
                return Ok(signing.token_with(env, std::time::SystemTime::now())?);
            }
            TokenSource::Env(name) => (name.as_str(), env(name)),
            TokenSource::GitlabDefault => (DEFAULT_TOKEN_ENV, env(DEFAULT_TOKEN_ENV)),
        };
        let token = value.as_deref().map(str::trim).unwrap_or_default();
        if token.is_empty() {
            // In a GitLab job the fix is the job's `id_tokens:` entry.
            return Err(if in_gitlab_job(&env) {
                ClientError::NoGitlabToken {
                    name: name.to_owned(),
                }
            } else {
                ClientError::EnvUnset {
                    name: name.to_owned(),
                }
            });
        }
        if !looks_like_jwt(token) {
            return Err(ClientError::EnvNotAJwt {
                name: name.to_owned(),
            });
        }
        Ok(token.to_owned())
    }

    /// Whether a failure to find the token is a usage error (exit 64).
    #[must_use]
    pub fn is_usage_error(e: &ClientError) -> bool {
        matches!(
            e,
            ClientError::NoToken
                | ClientError::NoGitlabToken { .. }
                | ClientError::EnvUnset { .. }
                | ClientError::EnvNotAJwt { .. }
                | ClientError::Aws(_)
        )
    }
}

/// Reads a token file (e.g. `$CI_JOB_JWT`-style files), trimmed, and checks
/// it has the shape of a JWT.
pub fn read_token_file(path: &Path) -> Result<String, ClientError> {
    let raw = std::fs::read_to_string(path).map_err(|source| ClientError::ReadToken {
        path: path.to_owned(),
        source,
    })?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(ClientError::EmptyToken {
            path: path.to_owned(),
        });
    }
    // A signed AWS request saved by a job (`policy explain` reads them too).
    if !looks_like_jwt(token) && !token.starts_with(super::aws::TOKEN_PREFIX) {
        return Err(ClientError::NotAJwt {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Connects to `target` (intercepted by the agent), sends the preamble and
/// waits for the verdict. On `ok` the stream is ready for the client's own
/// protocol; nothing after the response has been read from it.
pub async fn connect_with_preamble(
    target: SocketAddr,
    token: &str,
    timeout: Duration,
) -> Result<TcpStream, ClientError> {
    let preamble = encode_preamble(token).map_err(ClientError::Token)?;
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| ClientError::ConnectTimeout { target, timeout })?
        .map_err(|source| ClientError::Connect { target, source })?;
    stream
        .write_all(&preamble)
        .await
        .map_err(|source| ClientError::Send { target, source })?;
    let answer = read_response(&mut stream, timeout)
        .await
        .map_err(|source| match &source {
            PreambleError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                ClientError::ResetBeforeAnswer { target }
            }
            _ => ClientError::Answer { target, source },
        })?;
    match answer.status {
        Status::Ok => Ok(stream),
        Status::Denied => Err(ClientError::Denied {
            message: answer.message,
        }),
        Status::Error => Err(ClientError::Agent {
            message: answer.message,
        }),
    }
}

const API_TIMEOUT: Duration = Duration::from_secs(30);

/// `POST {api_url}/v1/grants` with the token as bearer. `ca_file` adds a
/// trusted CA for an https API with a private certificate.
pub async fn request_grant(
    api_url: &str,
    token: &str,
    destinations: Option<&[Destination]>,
    lifetime: Option<Duration>,
    ca_file: Option<&Path>,
) -> Result<GrantResponse, ClientError> {
    let base = api_url.trim_end_matches('/');
    if !(base.starts_with("https://") || base.starts_with("http://")) {
        return Err(ClientError::BadUrl {
            url: api_url.to_owned(),
        });
    }
    let url = format!("{base}/v1/grants");
    let http_err = |source| ClientError::Http {
        url: url.clone(),
        source,
    };
    let mut builder = reqwest::Client::builder().timeout(API_TIMEOUT);
    if let Some(path) = ca_file {
        builder = builder
            .tls_backend_preconfigured(super::trust::client_config(path).map_err(ClientError::Ca)?);
    }
    let client = builder.build().map_err(http_err)?;
    let resp = client
        .post(&url)
        .bearer_auth(token)
        .json(&GrantRequest::new(destinations, lifetime))
        .send()
        .await
        .map_err(|source| untrusted(&url, ca_file, &source).unwrap_or_else(|| http_err(source)))?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(http_err)?;
    if (200..300).contains(&status) {
        return serde_json::from_slice(&body).map_err(|_| unexpected(status, &body));
    }
    match serde_json::from_slice::<ApiError>(&body) {
        Ok(e) => Err(ClientError::Api {
            status,
            error: e.error,
            message: e.message,
        }),
        Err(_) => Err(unexpected(status, &body)),
    }
}

/// A certificate refusal, said plainly, with what to do about it.
fn untrusted(url: &str, ca_file: Option<&Path>, error: &reqwest::Error) -> Option<ClientError> {
    use tokio_rustls::rustls::CertificateError as E;
    let problem = super::trust::certificate_error(error)?.clone();
    let hint = match (&problem, ca_file) {
        (E::UnknownIssuer, None) => "; for a private CA, give its certificate with --ca FILE",
        (E::UnknownIssuer, Some(_)) => {
            "; --ca must hold the CA that signed the API's certificate (or that certificate itself)"
        }
        (E::Other(_), _) => {
            "; a self-signed certificate (CA:TRUE) is trusted only when --ca is that certificate itself"
        }
        (E::NotValidForName | E::NotValidForNameContext { .. }, _) => {
            "; the certificate needs a subjectAltName with the address or name in --api"
        }
        _ => "",
    };
    Some(ClientError::Untrusted {
        url: url.to_owned(),
        trusted: ca_file.map_or_else(
            || "the system trust store".to_owned(),
            |p| format!("the CA file {}", p.display()),
        ),
        problem,
        hint,
    })
}

fn unexpected(status: u16, body: &[u8]) -> ClientError {
    let text = String::from_utf8_lossy(body);
    let snippet: String = text.chars().take(200).collect();
    ClientError::UnexpectedBody { status, snippet }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n").expect("write");
        assert_eq!(
            read_token_file(&path).expect("token"),
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
        );
        std::fs::write(&path, " \n").expect("write");
        assert!(matches!(
            read_token_file(&path),
            Err(ClientError::EmptyToken { .. })
        ));
        std::fs::write(&path, "not a token").expect("write");
        assert!(matches!(
            read_token_file(&path),
            Err(ClientError::NotAJwt { .. })
        ));
        std::fs::write(&path, "a.b.c.d").expect("write");
        assert!(matches!(
            read_token_file(&path),
            Err(ClientError::NotAJwt { .. })
        ));
        let missing = dir.path().join("missing");
        assert!(matches!(
            read_token_file(&missing),
            Err(ClientError::ReadToken { .. })
        ));
    }
}
