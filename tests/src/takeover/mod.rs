//! Takeover fixtures: a successor of a running agent (`tcpgate run
//! --takeover` with the same configuration), the authenticating agent the
//! takeover-of-grants tests start from ([`AuthTakeover`]), and, in
//! [`transfer`], a transfer each way that stops at checkpoints, so a
//! takeover provably happens while both directions still have bytes to
//! move.

mod transfer;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::Agent;
use crate::Netns;
use crate::auth_fixture::{AuthFixture, Launch};
pub use transfer::{SteppedTransfer, check_digest, duplex_server, duplex_upstream, echo_once};

/// `[agent]` lines giving an agent a takeover socket of its own in `dir`.
pub fn agent_lines(dir: &Path) -> String {
    format!(
        "takeover_socket = {:?}\ntakeover_timeout = \"20s\"\n",
        dir.join("takeover.sock").display().to_string()
    )
}

/// An `[admin]` section with an operator socket in `dir`: every agent
/// sharing the configuration binds it in turn (the last one answers).
pub fn admin_lines(dir: &Path) -> String {
    format!(
        "\n[admin]\nsocket = {:?}\n",
        dir.join("admin.sock").display().to_string()
    )
}

/// A forward fixture whose agent (on `path`) has its own takeover and
/// operator sockets in `dir`.
pub fn forward_fixture(path: crate::DataPath, dir: &Path) -> Result<crate::ForwardFixture> {
    crate::ForwardFixture::start_tuned(path, &agent_lines(dir), &admin_lines(dir))
}

/// `GET /v1/sessions` on the operator socket in `dir` (see
/// [`admin_lines`]): the live sessions of the agent answering there.
pub fn listed_sessions(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let answer = crate::metrics::get_unix(&dir.join("admin.sock"), "/v1/sessions")?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end: {answer:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}: {body}");
    let doc: serde_json::Value = serde_json::from_str(body).with_context(|| body.to_owned())?;
    doc.as_array().cloned().context("a sessions array")
}

/// The first line of `agent`'s log containing `needle`, without its
/// colour codes (fields then read `name=value`).
pub fn log_line(agent: &Agent, needle: &str) -> Option<String> {
    let logs = agent.logs();
    let line = logs.lines().find(|l| l.contains(needle))?;
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    Some(plain)
}

/// The value of field `name` in a [`log_line`].
#[must_use]
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split_whitespace().next()
}

/// The setup the takeover-of-grants tests start from: an authenticating
/// agent (`policy("15m")`) with a takeover socket of its own in a
/// temporary directory, and its successors (same arguments).
pub struct AuthTakeover {
    pub fx: AuthFixture,
    /// Holds the takeover socket; removed on drop.
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

/// Builds an [`AuthTakeover`]: `AuthTakeover::builder().args(..).start()`.
#[derive(Default)]
pub struct AuthTakeoverBuilder {
    args: Vec<String>,
    launch: Launch,
}

impl AuthTakeoverBuilder {
    /// Arguments of the agent and of its successors (e.g. `--datapath`).
    #[must_use]
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Starts the agent as `launch` says; the takeover socket's lines are
    /// added to its `agent_extra`.
    #[must_use]
    pub fn launch(mut self, launch: Launch) -> Self {
        self.launch = launch;
        self
    }

    pub fn start(self) -> Result<AuthTakeover> {
        let dir = tempfile::tempdir()?;
        let mut launch = self.launch;
        launch.agent_extra.push_str(&agent_lines(dir.path()));
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let fx = AuthFixture::start_launched(&crate::auth_fixture::policy("15m"), &args, launch)?;
        Ok(AuthTakeover {
            fx,
            dir,
            args: self.args,
        })
    }
}

impl AuthTakeover {
    #[must_use]
    pub fn builder() -> AuthTakeoverBuilder {
        AuthTakeoverBuilder::default()
    }

    /// With no arguments and the default launch.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// Starts a successor (same arguments) and waits until the agent says
    /// it was taken over.
    pub fn take_over(&self) -> Result<Agent> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let next = successor(
            &self.fx.topo.bastion,
            self.fx.agent.config_path(),
            &args,
            &[],
        )?;
        wait_taken_over(&self.fx.agent)?;
        Ok(next)
    }
}

/// Waits (a minute at most) for `agent` to exit by itself, which it must
/// for the reason `why` gives, and checks it exited successfully.
pub fn exits_by_itself(agent: &mut Agent, why: &str) -> Result<()> {
    let status = agent
        .wait_exit(Duration::from_secs(60))?
        .with_context(|| why.to_owned())?;
    ensure!(status.success(), "{status:?}\n{}", agent.logs_tail(20));
    Ok(())
}

/// Stops `agent` (SIGTERM) and checks it exited successfully.
pub fn stops_cleanly(agent: &mut Agent) -> Result<()> {
    let status = agent.stop()?;
    ensure!(status.success(), "{status:?}\n{}", agent.logs_tail(20));
    Ok(())
}

/// A runner's streaming session through an authenticating agent (started
/// with `args` and a takeover socket of its own), admitted by a grant
/// expiring at `exp`, and a successor (same `args`) that took over.
pub struct GrantedTakeover {
    pub fx: AuthFixture,
    pub dir: tempfile::TempDir,
    pub server: crate::AcceptLoop<u64>,
    pub token: String,
    pub grant: String,
    /// The session's client end; it has read a first chunk.
    pub stream: TcpStream,
    pub next: Agent,
}

impl GrantedTakeover {
    pub fn start(args: &[&str], exp: u64, jti: &str) -> Result<Self> {
        let setup = AuthTakeover::builder().args(args).start()?;
        let fx = &setup.fx;
        let server = crate::auth_fixture::streamer(fx, Duration::from_secs(90))?;
        let token = fx.keys.rsa.sign(&crate::tokens::claims_with(&[
            ("exp", serde_json::json!(exp)),
            ("jti", serde_json::json!(jti)),
        ]));
        let grant = fx.grant_from_runner(&token, &[])?;
        let mut stream = fx.dial_from_runner(AuthFixture::target(5432))?;
        let mut buf = vec![0u8; 64 * 1024];
        stream.read_exact(&mut buf)?;
        let next = setup.take_over()?;
        let AuthTakeover { fx, dir, .. } = setup;
        Ok(Self {
            fx,
            dir,
            server,
            token,
            grant,
            stream,
            next,
        })
    }
}

/// Starts `tcpgate run --takeover` in `ns` with the configuration at
/// `config` (a running agent's: its pin directory, audit file and takeover
/// socket), plus `args`, and waits for it to be ready: it then accepts on
/// the inherited listeners.
pub fn successor(ns: &Netns, config: &Path, args: &[&str], envs: &[(&str, &str)]) -> Result<Agent> {
    let config = std::fs::read_to_string(config)?;
    let mut builder = Agent::builder(ns)?
        .config(config)
        .arg("--takeover")
        .args(args)
        .ready_timeout(Duration::from_secs(60));
    for (key, value) in envs {
        builder = builder.env(key, value);
    }
    Ok(builder.spawn()?)
}

/// Waits until `old` says it was taken over.
pub fn wait_taken_over(old: &Agent) -> Result<()> {
    Ok(old.wait_for_log(
        "taken over: no new connections here",
        Duration::from_secs(30),
    )?)
}
