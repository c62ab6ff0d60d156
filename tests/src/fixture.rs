//! The forward fixture (runner → bastion agent with one static forward →
//! target) that the data path suites share, the data paths every
//! correctness test runs on, and waits for the agent's audit lines.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use serde_json::Value;

use crate::inspect::assert_maps_empty;
use crate::moved::{assert_bytes, assert_bytes_with};
use crate::topology::{BASTION_RUNNER_V4, TARGET_V4};
use crate::{Agent, Payload, Topology, dial};

/// The data paths; every correctness test runs on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// The kernel path: the SOCKHASH splice from the first byte.
    Ebpf,
    /// The agent copies every byte.
    Userspace,
    /// The kernel path with `agent.splice_after_bytes` =
    /// [`COPY_FIRST_BUDGET`]: the agent copies a session's first bytes and
    /// splices only longer sessions.
    CopyFirst,
}

/// The budget of [`DataPath::CopyFirst`] (both directions together).
pub const COPY_FIRST_BUDGET: u64 = 64 * 1024;

impl DataPath {
    /// The agent's `--datapath` argument.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Ebpf | Self::CopyFirst => "ebpf",
            Self::Userspace => "userspace",
        }
    }

    /// The `[agent]` lines the path needs besides `--datapath`.
    pub fn agent_lines(self) -> String {
        match self {
            Self::Ebpf | Self::Userspace => String::new(),
            Self::CopyFirst => format!("splice_after_bytes = {COPY_FIRST_BUDGET}"),
        }
    }

    /// The path's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Userspace => "userspace",
            Self::CopyFirst => "copy-first",
        }
    }

    /// Whether a session's audit `datapath` may be `datapath` on this
    /// path: a copy-first session that ends (or half-closes) within its
    /// budget is never spliced and says `userspace`.
    pub fn may_say(self, datapath: &Value) -> bool {
        match self {
            Self::Ebpf | Self::Userspace => *datapath == self.flag(),
            Self::CopyFirst => *datapath == "ebpf" || *datapath == "userspace",
        }
    }
}

/// Generates one `#[test]` per data path from a `fn(DataPath) -> Result<()>`.
#[macro_export]
macro_rules! on_every_path {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn ebpf() -> anyhow::Result<()> {
                    if !$crate::require_root() {
                        return Ok(());
                    }
                    super::$name($crate::DataPath::Ebpf)
                }
                #[test]
                fn userspace() -> anyhow::Result<()> {
                    if !$crate::require_root() {
                        return Ok(());
                    }
                    super::$name($crate::DataPath::Userspace)
                }
                #[test]
                fn copy_first() -> anyhow::Result<()> {
                    if !$crate::require_root() {
                        return Ok(());
                    }
                    super::$name($crate::DataPath::CopyFirst)
                }
            }
        )*
    };
}

/// Port the forward listens on in the bastion.
pub const LISTEN_PORT: u16 = 7000;
/// Port the upstream server listens on in the target.
pub const UPSTREAM_PORT: u16 = 9000;

/// runner → bastion (agent with one static forward) → target.
pub struct ForwardFixture {
    /// Dropped after the agent (field order), so the agent stops first.
    pub agent: Agent,
    pub topo: Topology,
    pub path: DataPath,
}

impl ForwardFixture {
    pub fn start(path: DataPath) -> Result<Self> {
        Self::start_with(path, "")
    }

    /// `extra` is appended to the generated config (more sections).
    pub fn start_with(path: DataPath, extra: &str) -> Result<Self> {
        Self::start_tuned(path, "", extra)
    }

    /// `agent` holds more `[agent]` settings, one per line; `extra` is
    /// appended to the generated config (more sections).
    pub fn start_tuned(path: DataPath, agent: &str, extra: &str) -> Result<Self> {
        Self::start_run(path, agent, extra, &[])
    }

    /// As [`Self::start_tuned`], with more `tcpgate run` arguments (e.g.
    /// `--supervise`).
    pub fn start_run(path: DataPath, agent: &str, extra: &str, args: &[&str]) -> Result<Self> {
        Self::start_run_env(path, agent, extra, args, &[])
    }

    /// As [`Self::start_run`], with environment variables for the agent
    /// (test hooks).
    pub fn start_run_env(
        path: DataPath,
        agent: &str,
        extra: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let topo = Topology::new()?;
        let mut builder = Agent::builder(&topo.bastion)?;
        for (key, value) in envs {
            builder = builder.env(key, value);
        }
        let config = format!(
            "auth = \"none\"\n[agent]\npin_dir = {pin:?}\ndrain_timeout = \"20s\"\n{path_lines}\n{agent}\n\n[audit]\npath = {audit:?}\n\n\
             [[forward]]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n{extra}",
            pin = builder.pin_dir().display().to_string(),
            path_lines = path.agent_lines(),
            audit = builder.audit_path().display().to_string(),
            listen = SocketAddr::from((BASTION_RUNNER_V4, LISTEN_PORT)),
            upstream = SocketAddr::from((TARGET_V4, UPSTREAM_PORT)),
        );
        let agent = builder
            .config(config)
            .args(["--datapath", path.flag()])
            .args(args)
            .spawn()?;
        Ok(Self { agent, topo, path })
    }

    pub fn upstream_addr(&self) -> SocketAddr {
        SocketAddr::from((TARGET_V4, UPSTREAM_PORT))
    }

    /// Dials the forward from the runner namespace.
    pub fn dial(&self) -> Result<TcpStream> {
        Ok(dial(
            &self.topo.runner,
            SocketAddr::from((BASTION_RUNNER_V4, LISTEN_PORT)),
        )?)
    }

    /// One request/reply exchange with a half-close: the target reads the
    /// whole request, then answers `reply`; the client sends `request`,
    /// shuts its write side and reads the reply to EOF. Both ends' SHA-256
    /// are checked.
    pub fn half_close_exchange(&self, request: Payload, reply: Payload) -> Result<()> {
        let (up, down) = (request.len, reply.len);
        let (sent, answer) = (request.digest(), reply.digest());
        let server = crate::serve_once(
            &self.topo.target,
            self.upstream_addr(),
            move |mut stream, _| -> Result<_> {
                let got = crate::read_to_end_hashed(&mut stream)?;
                crate::write_payload(&mut stream, &reply)?;
                Ok(got)
            },
        )?;
        let mut client = self.dial()?;
        crate::write_payload(&mut client, &request)?;
        client.shutdown(std::net::Shutdown::Write)?;
        let got = crate::read_to_end_hashed(&mut client)?;
        ensure!(got == (down, answer), "reply: {got:?}");
        let received = server.join()??;
        ensure!(received == (up, sent), "request: {received:?}");
        Ok(())
    }

    /// Waits for the `n`-th `session_close` audit event and returns all of them.
    pub fn wait_closed(&self, n: usize) -> Result<Vec<Value>> {
        wait_events(&self.agent, "session_close", n)
    }

    /// The agent's recent log and audit lines, for failure messages.
    pub fn dump(&self) -> String {
        let audit = self.agent.audit_events().map(|events| {
            events
                .iter()
                .rev()
                .take(6)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        });
        format!(
            "agent log tail:\n{}\naudit tail:\n{}",
            self.agent.logs_tail(60),
            audit.unwrap_or_default()
        )
    }

    /// Asserts which path moved the bytes of a closed session, and how many.
    pub fn assert_bytes(&self, event: &Value, up: u64, down: u64) -> Result<()> {
        assert_bytes(self.path, event, up, down)
    }

    /// For bulk transfers whose receiver may lag (see [`assert_bytes_with`]).
    pub fn assert_bulk_bytes(&self, event: &Value, up: u64, down: u64) -> Result<()> {
        assert_bytes_with(self.path, event, up, down, true)
    }

    /// Asserts the pinned session and socket maps hold no entry.
    pub fn assert_maps_empty(&self) -> Result<()> {
        if self.path != DataPath::Userspace {
            assert_maps_empty(self.agent.pin_dir())?;
        }
        Ok(())
    }
}

/// Waits (bounded) until the audit log holds at least `n` events of `kind`.
pub fn wait_events(agent: &Agent, kind: &str, n: usize) -> Result<Vec<Value>> {
    wait_events_within(agent, kind, n, Duration::from_secs(60))
}

/// [`wait_events`] with its own bound.
pub fn wait_events_within(
    agent: &Agent,
    kind: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let mut found = 0;
    crate::eventually(timeout, &format!("{n} {kind} events"), || -> Result<_> {
        let events: Vec<Value> = agent
            .audit_events()?
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect();
        found = events.len();
        Ok((events.len() >= n).then_some(events))
    })
    .map_err(|e| match e.downcast::<crate::NotWithin>() {
        Ok(_) => anyhow!(
            "only {found} of {n} {kind} events after {timeout:?}; agent log:\n{}",
            agent.logs_tail(30)
        ),
        Err(e) => e,
    })
}

/// The agent's configuration with interception of `prefixes`
/// (`(prefix, ports)`), written for a builder.
pub fn intercept_config(
    builder: &crate::AgentBuilder<'_>,
    prefixes: &[(&str, &[&str])],
    extra: &str,
) -> String {
    let mut config = format!(
        "auth = \"none\"\n[agent]\npin_dir = {:?}\n\n[audit]\npath = {:?}\n\n[intercept]\n",
        builder.pin_dir().display().to_string(),
        builder.audit_path().display().to_string(),
    );
    config.push_str(&intercept_prefixes(prefixes));
    config.push_str(extra);
    config
}

pub fn intercept_prefixes(prefixes: &[(&str, &[&str])]) -> String {
    prefixes
        .iter()
        .map(|(prefix, ports)| {
            let ports: Vec<String> = ports.iter().map(|p| format!("{p:?}")).collect();
            format!(
                "\n[[intercept.prefix]]\nprefix = {prefix:?}\nports = [{}]\n",
                ports.join(", ")
            )
        })
        .collect()
}
