//! The chaos agent: an intercepting agent in the runner ⇄ bastion ⇄ target
//! topology, with its operator endpoint, optionally token authentication
//! (a real JWKS over HTTPS), and the chaos upstream on the target.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use tcpgate_tests::jwks_server::JwksServer;
use tcpgate_tests::metrics::{Exposition, get_unix, parse, scrape_unix};
use tcpgate_tests::tokens::{AUDIENCE, ISSUER, gitlab_claims};
use tcpgate_tests::topology::{BASTION_RUNNER_IF, TARGET_V4};
use tcpgate_tests::{Agent, Netns, Topology};

use super::upstream::Upstream;
use tcpgate_tests::auth_fixture::{Keys, authenticate};

/// The intercepted service port (on 192.0.2.0/24 and the islands).
pub const SERVICE_PORT: u16 = 9000;
/// The operator endpoints inside the bastion namespace.
/// Prefix of the extra upstream hosts some cases add (see `faults.rs`).
pub const ISLANDS: &str = "203.0.113.128/27";
/// Read and write timeout of every legitimate client stream: a client that
/// waits longer than this is a hang, and fails its case.
pub const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(30);

pub fn service() -> SocketAddr {
    SocketAddr::from((TARGET_V4, SERVICE_PORT))
}

#[derive(Debug, Clone)]
pub struct Options {
    /// `ebpf` or `userspace`.
    pub datapath: &'static str,
    /// Token authentication with a preamble (the policy of the auth suite).
    pub auth: bool,
    /// Extra lines for `[agent]`, e.g. `stall_timeout = "3s"`.
    pub agent_extra: String,
}

impl Options {
    pub fn ebpf() -> Self {
        Self {
            datapath: "ebpf",
            auth: false,
            agent_extra: String::new(),
        }
    }

    pub fn with_auth(mut self) -> Self {
        self.auth = true;
        self
    }

    pub fn agent(mut self, line: &str) -> Self {
        self.agent_extra.push_str(line);
        self.agent_extra.push('\n');
        self
    }
}

pub struct Auth {
    pub jwks: JwksServer,
    pub keys: Keys,
}

/// Fields drop in order: the agent stops before its upstream and topology.
pub struct Fixture {
    pub agent: Agent,
    pub upstream: Upstream,
    pub auth: Option<Auth>,
    pub options: Options,
    /// The agent's pin directory; the same across a restart.
    pub pin_dir: PathBuf,
    pub topo: Topology,
}

impl Fixture {
    pub fn start(options: Options) -> Result<Self> {
        tcpgate_tests::raise_nofile();
        let topo = Topology::new()?;
        let upstream = Upstream::start(&topo.target, service())?;
        let auth = if options.auth {
            let keys = Keys::new();
            let jwks = JwksServer::start(&topo.bastion, "127.0.0.1:0".parse()?, keys.jwks())?;
            Some(Auth { jwks, keys })
        } else {
            None
        };
        let agent = spawn_agent(&topo, &options, auth.as_ref(), None)?;
        Ok(Self {
            pin_dir: agent.pin_dir().to_owned(),
            agent,
            upstream,
            auth,
            options,
            topo,
        })
    }

    /// Starts another agent with the same configuration and pin directory
    /// (the previous agent's, to test its cleanup after a crash).
    pub fn spawn_agent(&self) -> Result<Agent> {
        spawn_agent(
            &self.topo,
            &self.options,
            self.auth.as_ref(),
            Some(&self.pin_dir),
        )
    }

    /// A valid token for the policy.
    pub fn token(&self) -> Option<String> {
        self.auth
            .as_ref()
            .map(|a| a.keys.rsa.sign(&gitlab_claims()))
    }

    /// Connects from the runner to the service, authenticated when the
    /// agent wants tokens; ready for the chaos protocol.
    pub fn dial(&self) -> Result<TcpStream> {
        self.dial_to(service())
    }

    pub fn dial_to(&self, addr: SocketAddr) -> Result<TcpStream> {
        let mut stream = dial_raw(&self.topo.runner, addr)?;
        if let Some(token) = self.token() {
            let (status, message) = authenticate(&mut stream, &token)?;
            ensure!(status == 0, "a valid token was refused: {status} {message}");
        }
        Ok(stream)
    }

    /// `GET <path>` on the operator endpoint; the body.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        http_get(&self.admin_socket(), path)
    }

    /// `GET /v1/sessions`: the agent's live sessions.
    pub fn live_sessions(&self) -> Result<Vec<Value>> {
        let body = self.admin_get("/v1/sessions")?;
        let doc: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        doc.as_array().cloned().context("sessions array")
    }

    pub fn metrics(&self) -> Result<Exposition> {
        Ok(parse(&scrape_unix(&self.admin_socket())?)?)
    }

    /// The running agent's operator socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.agent.dir().join("admin.sock")
    }

    pub fn sessions_live_gauge(&self) -> Result<f64> {
        self.metrics()?
            .value("tcpgate_sessions_live", &[])
            .context("tcpgate_sessions_live")
    }

    pub fn is_ebpf(&self) -> bool {
        self.options.datapath == "ebpf"
    }

    /// Audit events of `kind`, once at least `n` are there (bounded wait).
    /// Polls slowly: the audit of a junk flood is thousands of lines.
    pub fn wait_audit(&self, kind: &str, n: usize, timeout: Duration) -> Result<Vec<Value>> {
        tcpgate_tests::wait_events_within(&self.agent, kind, n, timeout)
    }

    /// Waits (bounded) until the agent holds no session: the operator
    /// endpoint lists none, the gauge reads 0, and on the kernel path the
    /// pinned session and socket maps are empty (read with bpftool).
    pub fn wait_idle(&self) -> Result<()> {
        // A busy agent is "not yet"; the last reason why is the error.
        let mut busy = None;
        let idle = tcpgate_tests::eventually(Duration::from_secs(15), "the agent idle", || {
            busy = self.idle_state().err();
            busy.is_none()
        });
        idle.map_err(|timeout| {
            busy.take()
                .unwrap_or_else(|| timeout.into())
                .context(format!(
                    "the agent still holds sessions 15 s after the last one ended\n{}",
                    self.agent.logs_tail(20)
                ))
        })
    }

    fn idle_state(&self) -> Result<()> {
        let listed = self.live_sessions()?;
        ensure!(listed.is_empty(), "GET /v1/sessions lists {listed:?}");
        let gauge = self.sessions_live_gauge()?;
        ensure!(gauge == 0.0, "tcpgate_sessions_live is {gauge}");
        if self.is_ebpf() {
            tcpgate_tests::assert_maps_empty(&self.pin_dir)?;
        }
        Ok(())
    }

    /// Entries of a pinned map, read with bpftool (kernel path only).
    pub fn map_len(&self, map: &str) -> Result<usize> {
        Ok(tcpgate_tests::pinned_entries(&self.pin_dir, map)?.len())
    }
}

/// The agent's configuration: interception of the service on the target
/// and on the islands, the operator endpoint, `[auth]` when asked.
fn config(
    builder_pin: &Path,
    audit: &Path,
    admin: &Path,
    options: &Options,
    auth: Option<&Auth>,
) -> Result<String> {
    // A root key, so it goes before the first table.
    let no_auth = if auth.is_none() {
        "auth = \"none\"\n"
    } else {
        ""
    };
    let mut config = format!(
        "{no_auth}[agent]\npin_dir = {pin:?}\nshutdown_grace = \"1s\"\n{extra}\n\
         [audit]\npath = {audit:?}\n\n[admin]\nsocket = {admin:?}\n\n\
         [intercept]\ninterfaces = [\"{BASTION_RUNNER_IF}\"]\n\
         [[intercept.prefix]]\nprefix = \"192.0.2.0/24\"\nports = [\"{SERVICE_PORT}\"]\n\
         [[intercept.prefix]]\nprefix = \"{ISLANDS}\"\nports = [\"{SERVICE_PORT}\"]\n",
        pin = builder_pin.display().to_string(),
        audit = audit.display().to_string(),
        admin = admin.display().to_string(),
        extra = options.agent_extra,
    );
    if let Some(auth) = auth {
        config.push_str(&format!(
            "\n[auth]\npreamble_timeout = \"2s\"\n\
             [[auth.issuer]]\nissuer = {ISSUER:?}\naudience = {AUDIENCE:?}\njwks_url = {url:?}\n\
             ca_file = {ca:?}\nmin_refresh_interval = \"1s\"\n",
            url = auth.jwks.url(),
            ca = auth.jwks.ca_file().display().to_string(),
        ));
        // The auth suite's rule, on the one intercepted port.
        config.push_str(&format!(
            "\n[[policy]]\nname = \"deploy\"\nissuer = {ISSUER:?}\nmax_lifetime = \"15m\"\n\
             match = {{ project_path = \"group/app\", ref_protected = true, ref = \"release/*\" }}\n\
             allow = [ {{ prefix = \"192.0.2.0/24\", ports = [\"{SERVICE_PORT}\"] }} ]\n"
        ));
    }
    Ok(config)
}

fn spawn_agent(
    topo: &Topology,
    options: &Options,
    auth: Option<&Auth>,
    pin_dir: Option<&Path>,
) -> Result<Agent> {
    let builder = Agent::builder(&topo.bastion)?;
    let pin = pin_dir.map_or_else(|| builder.pin_dir().to_owned(), Path::to_owned);
    let admin = builder.dir().join("admin.sock");
    let config = config(&pin, &builder.audit_path(), &admin, options, auth)?;
    Ok(builder
        .config(config)
        .args(["--datapath", options.datapath])
        .spawn()?)
}

/// A plain connection from `ns` with the client I/O timeouts.
pub fn dial_raw(ns: &Netns, addr: SocketAddr) -> Result<TcpStream> {
    let stream = ns
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(CLIENT_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_IO_TIMEOUT))?;
    Ok(stream)
}

/// A minimal HTTP/1.1 GET on the operator socket; returns the body of a 200.
pub fn http_get(socket: &Path, path: &str) -> Result<String> {
    let answer = get_unix(socket, path).with_context(|| format!("GET {path}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end: {answer:?}"))?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "GET answered {head:?}: {body}"
    );
    Ok(body.to_owned())
}

/// Connection-denied audit events by the reason that matters: the audit
/// reason, or for `auth_failed` the gate's reason that starts the detail.
pub fn denial_reasons(events: &[Value]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for event in events.iter().filter(|e| e["event"] == "connection_denied") {
        let reason = match event["reason"].as_str() {
            Some("auth_failed") => event["detail"]
                .as_str()
                .and_then(|d| d.split(':').next())
                .unwrap_or("?")
                .to_owned(),
            Some(other) => other.to_owned(),
            None => "?".to_owned(),
        };
        *counts.entry(reason).or_default() += 1;
    }
    counts
}

/// `tcpgate_connections_denied_total` by its `reason` label.
pub fn denied_metrics(m: &Exposition) -> std::collections::BTreeMap<String, usize> {
    m.samples
        .iter()
        .filter(|s| s.name == "tcpgate_connections_denied_total")
        .filter_map(|s| Some((s.labels.get("reason")?.clone(), s.value as usize)))
        .collect()
}
