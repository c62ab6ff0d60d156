//! moto's server mode (PyPI `moto[server]`, installed into a venv by
//! `cargo xtask setup`): a real STS implementation on loopback inside a
//! test namespace. It answers `GetCallerIdentity` in AWS's XML, and
//! `AssumeRole` hands out session credentials whose identity is the
//! assumed role. moto does not check signatures; the bastion's own checks
//! (server id, date, action) are what the tests exercise against it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::netns::Netns;
use crate::process::{ChildGuard, ProcessError};
use crate::servers::{ServerError, bind, dial};

/// Where `cargo xtask setup` installs moto's server.
pub const DEFAULT_MOTO_SERVER: &str = "/opt/tcpgate-test/moto-venv/bin/moto_server";
/// Overrides [`DEFAULT_MOTO_SERVER`].
pub const MOTO_SERVER_ENV: &str = "TCPGATE_MOTO_SERVER";
/// moto imports all its services before it listens.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error("{0} does not exist: run `cargo xtask setup` (it installs moto[server] into a venv)")]
    NotInstalled(PathBuf),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot create moto's log directory")]
    LogDir(#[source] std::io::Error),
    #[error("moto did not listen on {addr}: {log}")]
    NotListening { addr: SocketAddr, log: String },
    #[error("curl to moto failed")]
    Curl(#[source] std::io::Error),
    #[error("moto's AssumeRole answer has no {field}: {answer}")]
    Answer { field: &'static str, answer: String },
}

/// Session credentials from `AssumeRole`.
#[derive(Debug, Clone)]
pub struct SessionCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
}

impl SessionCredentials {
    /// The standard AWS environment variables for these credentials.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_SESSION_TOKEN", self.session_token.clone()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
    }
}

/// A running moto server; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Moto {
    addr: SocketAddr,
    process: Option<ChildGuard>,
    _logs: tempfile::TempDir,
}

impl Moto {
    /// Starts moto on a free port of 127.0.0.1 inside `ns`.
    pub fn start(ns: &Netns) -> Result<Moto, MotoError> {
        let program = std::env::var_os(MOTO_SERVER_ENV)
            .map_or_else(|| PathBuf::from(DEFAULT_MOTO_SERVER), PathBuf::from);
        if !program.exists() {
            return Err(MotoError::NotInstalled(program));
        }
        // A port the kernel just handed out in this namespace, free again.
        let addr = bind(ns, "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()))?
            .local_addr()
            .map_err(|source| ServerError::Bind {
                netns: ns.name().to_owned(),
                addr: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
                source,
            })?;
        let logs = tempfile::Builder::new()
            .prefix("tcpgate-moto-")
            .tempdir()
            .map_err(MotoError::LogDir)?;
        let mut command = ns.command(&program);
        command.args(["-H", "127.0.0.1", "-p", &addr.port().to_string()]);
        let process = ChildGuard::spawn_logged(&mut command, logs.path(), "moto")?;
        let mut moto = Moto {
            addr,
            process: Some(process),
            _logs: logs,
        };
        let listening = crate::eventually(START_TIMEOUT, "moto_server listening", || {
            dial(ns, addr).is_ok()
        });
        if listening.is_err() {
            let log = moto.log_tail();
            moto.stop();
            return Err(MotoError::NotListening { addr, log });
        }
        Ok(moto)
    }

    /// `http://127.0.0.1:PORT/`, as `[auth.aws] sts_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Stops moto now (an STS outage); the port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.terminate();
        }
    }

    fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.stderr_tail(20))
            .unwrap_or_default()
    }

    /// `AssumeRole` into `role_arn` as `session`, from inside `ns` (moto's
    /// namespace). moto routes by the credential scope of the Authorization
    /// header and does not check its signature.
    pub fn assume_role(
        &self,
        ns: &Netns,
        role_arn: &str,
        session: &str,
    ) -> Result<SessionCredentials, MotoError> {
        let body = format!(
            "Action=AssumeRole&Version=2011-06-15&RoleArn={role_arn}&RoleSessionName={session}"
        );
        let authz = "Authorization: AWS4-HMAC-SHA256 \
                     Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-east-1/sts/aws4_request, \
                     SignedHeaders=host;x-amz-date, Signature=00";
        let output = ns
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-X",
                "POST",
                "-H",
                authz,
                "--data",
                &body,
            ])
            .arg(self.url())
            .output()
            .map_err(MotoError::Curl)?;
        let answer = String::from_utf8_lossy(&output.stdout).into_owned();
        let field = |field: &'static str| {
            between(&answer, field).ok_or_else(|| MotoError::Answer {
                field,
                answer: answer.chars().take(400).collect(),
            })
        };
        Ok(SessionCredentials {
            access_key_id: field("AccessKeyId")?,
            secret_access_key: field("SecretAccessKey")?,
            session_token: field("SessionToken")?,
        })
    }
}

/// The text of the first `<tag>…</tag>` in `xml`.
fn between(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..end].to_owned())
}
