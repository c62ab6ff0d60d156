//! The contenders, all on the bastion and all on the same runner → bastion →
//! target path, started for their turn and stopped after it.
//!
//! tcpgate is measured the way it is deployed: the runner dials the real
//! target address and the bastion intercepts it. HAProxy and socat cannot
//! intercept, so the runner dials the bastion's address where they listen.
//! Both paths cross the same two veth links and the bastion's TCP stack.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;
use tcpgate_tests::topology::{BASTION_RUNNER_V4, TARGET_V4};
use tcpgate_tests::{Agent, ChildGuard, Netns, Topology};

use super::cpu::BenchCgroup;
use super::ports;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    /// Kernel forwarding through the bastion, no proxy: the limit.
    Direct,
    /// tcpgate with the in-kernel sockhash splice.
    TcpgateEbpf,
    /// tcpgate with `--datapath userspace` (the agent copies bytes).
    TcpgateUserspace,
    /// tcpgate with `[intercept.routed_grants]`: a granted runner's flows
    /// are forwarded, not terminated (see `routed.rs`).
    TcpgateRouted,
    Haproxy,
    Socat,
}

impl Contender {
    pub const ALL: [Contender; 6] = [
        Contender::Direct,
        Contender::TcpgateEbpf,
        Contender::TcpgateUserspace,
        Contender::TcpgateRouted,
        Contender::Haproxy,
        Contender::Socat,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::TcpgateEbpf => "tcpgate-ebpf",
            Contender::TcpgateUserspace => "tcpgate-userspace",
            Contender::TcpgateRouted => "tcpgate-routed",
            Contender::Haproxy => "haproxy",
            Contender::Socat => "socat",
        }
    }

    /// Where the runner connects to reach the target's service `service`.
    pub fn dial(self, service: Service) -> SocketAddr {
        let (plain, intercepted, proxied) = service.ports();
        match self {
            Contender::Direct => SocketAddr::from((TARGET_V4, plain)),
            Contender::TcpgateEbpf | Contender::TcpgateUserspace | Contender::TcpgateRouted => {
                SocketAddr::from((TARGET_V4, intercepted))
            }
            Contender::Haproxy | Contender::Socat => SocketAddr::from((BASTION_RUNNER_V4, proxied)),
        }
    }
}

/// A service on the target that the data-path measures use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Iperf,
    Echo,
    /// One byte echoed, then the target closes: the connection-rate cycle.
    Connect,
}

impl Service {
    pub(super) const ALL: [Service; 3] = [Service::Iperf, Service::Echo, Service::Connect];

    /// (target port dialled directly, target port tcpgate intercepts,
    /// bastion port HAProxy and socat listen on).
    pub(super) fn ports(self) -> (u16, u16, u16) {
        match self {
            Service::Iperf => (ports::IPERF, ports::IPERF_INTERCEPTED, ports::IPERF_PROXIED),
            Service::Echo => (ports::ECHO, ports::ECHO_INTERCEPTED, ports::ECHO_PROXIED),
            Service::Connect => (ports::CONN_PLAIN, ports::CONN_PREAMBLE, ports::CONN_PROXIED),
        }
    }
}

/// What the contenders need from the bench.
pub struct Env<'a> {
    pub topo: &'a Topology,
    pub agent_binary: &'a Path,
    pub cgroup: Option<&'a BenchCgroup>,
    pub work_dir: &'a Path,
    /// Present when the agent supports `[auth]` (routed grants need a grant).
    pub keys: Option<&'a super::auth::Keys>,
}

/// A contender running for its turn; dropping it stops it.
pub enum Running {
    Direct,
    Agent(Box<Agent>),
    Processes { guards: Vec<ChildGuard> },
}

impl Running {
    /// The processes doing the contender's work (none for *direct*), for
    /// their CPU per connection.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Running::Direct => Vec::new(),
            Running::Agent(agent) => vec![agent.pid()],
            Running::Processes { guards } => guards.iter().map(ChildGuard::pid).collect(),
        }
    }

    /// The agent's operator socket, for `--bpf-stats`.
    pub fn admin_socket(&self) -> Option<std::path::PathBuf> {
        match self {
            Running::Agent(agent) => Some(admin_socket(agent)),
            _ => None,
        }
    }
}

pub fn start(contender: Contender, env: &Env<'_>) -> Result<Running> {
    if matches!(
        contender,
        Contender::Direct | Contender::Haproxy | Contender::Socat
    ) {
        remove_guard(env)?;
    }
    match contender {
        Contender::Direct => Ok(Running::Direct),
        Contender::TcpgateEbpf => {
            start_agent(env, "ebpf", &agent_config_extra(None)).map(|a| Running::Agent(Box::new(a)))
        }
        Contender::TcpgateUserspace => start_agent(env, "userspace", &agent_config_extra(None))
            .map(|a| Running::Agent(Box::new(a))),
        Contender::TcpgateRouted => super::routed::start(env).map(|a| Running::Agent(Box::new(a))),
        Contender::Haproxy => {
            super::baselines::start_haproxy(env).map(|c| Running::Processes { guards: vec![c] })
        }
        Contender::Socat => {
            super::baselines::start_socat(env).map(|c| Running::Processes { guards: c })
        }
    }
}

/// A stopped agent leaves its guard table (which drops the target prefix
/// but for intercepted connections) in the bastion; the contenders that
/// reach the target without tcpgate need it gone.
fn remove_guard(env: &Env<'_>) -> Result<()> {
    tcpgate_tests::cmd::run_checked(
        env.topo
            .bastion
            .command(env.agent_binary)
            .args(["firewall", "remove"]),
    )?;
    Ok(())
}

/// Every port tcpgate intercepts on the target prefix: the data-path
/// services and the authentication measures' services.
pub fn intercepted_ports() -> Vec<u16> {
    vec![
        ports::IPERF_INTERCEPTED,
        ports::ECHO_INTERCEPTED,
        ports::CONN_PREAMBLE,
        ports::CONN_GRANT,
        ports::CONN_ROUTED,
        ports::IDLE,
        ports::TEARDOWN,
    ]
}

/// The `[intercept]` section, plus `auth` (the `[auth]`, `[[policy]]` and
/// `[api]` text) when given.
pub fn agent_config_extra(auth: Option<&str>) -> String {
    let ports: Vec<String> = intercepted_ports()
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect();
    format!(
        "\n[intercept]\n\n[[intercept.prefix]]\nprefix = \"{TARGET_V4}/32\"\nports = [{}]\n{}",
        ports.join(", "),
        auth.unwrap_or_default()
    )
}

/// The operator socket's file in a bench agent's directory.
const ADMIN_SOCKET: &str = "admin.sock";

/// Where a bench agent serves `/metrics` (`--bpf-stats` scrapes it).
pub fn admin_socket(agent: &Agent) -> std::path::PathBuf {
    agent.dir().join(ADMIN_SOCKET)
}

/// Starts the release agent on the bastion with `--datapath <datapath>`.
pub fn start_agent(env: &Env<'_>, datapath: &str, extra: &str) -> Result<Agent> {
    start_agent_tuned(env, datapath, "", extra)
}

/// [`start_agent`] with more `[agent]` settings, one per line.
pub fn start_agent_tuned(env: &Env<'_>, datapath: &str, agent: &str, extra: &str) -> Result<Agent> {
    let builder = Agent::builder(&env.topo.bastion)?;
    // Without the `[auth]` sections, say so: `auth = "none"` is a root key,
    // so it goes before the first table.
    let no_auth = if extra.contains("\n[auth]") {
        ""
    } else {
        "auth = \"none\"\n"
    };
    // The operator socket in the agent's own directory (`--bpf-stats`
    // scrapes it), never the machine's /run/tcpgate.
    let config = format!(
        "{no_auth}[agent]\npin_dir = {pin:?}\n{agent}\n[audit]\npath = {audit:?}\n\
         [admin]\nsocket = {admin:?}\n{extra}",
        pin = builder.pin_dir().display().to_string(),
        audit = builder.audit_path().display().to_string(),
        admin = builder.dir().join(ADMIN_SOCKET).display().to_string(),
    );
    let agent = builder
        .binary(env.agent_binary)
        .config(config)
        .args(["--datapath", datapath])
        // The bench wants the agent's cost, not its debug logs.
        .env("TCPGATE_LOG", "warn")
        .spawn()
        .context("starting the tcpgate agent")?;
    if let Some(cgroup) = env.cgroup {
        cgroup.adopt(agent.pid())?;
    }
    Ok(agent)
}

/// Waits (bounded) until `child` listens on every address of `binds` in
/// `ns`. Probing with `ss` rather than a connection keeps probes away from
/// the servers behind a proxy.
pub fn wait_listening(ns: &Netns, binds: &[SocketAddr], child: &mut ChildGuard) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening = ns.exec_ok(&["ss", "-Hltn"])?;
        let missing: Vec<SocketAddr> = binds
            .iter()
            .copied()
            .filter(|bind| !listening.contains(&format!("{bind} ")))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}) before listening:\n{}",
                child.name(),
                child.stderr_tail(20)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} is not listening on {missing:?} after 10 s",
                child.name()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After a tcpgate turn: the sessions the agent logged, to check that the
/// bytes went the way the contender claims (kernel vs user space).
#[derive(Debug, Default, Clone, Copy)]
pub struct PathCheck {
    pub sessions: usize,
    pub kernel_bytes: u64,
    pub userspace_bytes: u64,
    /// Of `userspace_bytes`: copied by the agent while a slow reader held a
    /// direction back (kernel-path backpressure), which is expected.
    pub backpressure_bytes: u64,
}

impl PathCheck {
    pub fn from_events(events: &[Value]) -> PathCheck {
        let mut check = PathCheck::default();
        for event in events.iter().filter(|e| e["event"] == "session_close") {
            let get = |key: &str| event[key].as_u64().unwrap_or(0);
            check.sessions += 1;
            check.kernel_bytes += get("kernel_bytes_up") + get("kernel_bytes_down");
            check.userspace_bytes += get("userspace_bytes_up") + get("userspace_bytes_down");
            check.backpressure_bytes +=
                get("backpressure_bytes_up") + get("backpressure_bytes_down");
        }
        check
    }
}

/// Sessions that did not end cleanly, by reason and detail, from audit
/// events: evidence for the lead when clients saw resets.
pub fn abnormal_ends(events: &[Value]) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for event in events.iter().filter(|e| e["event"] == "session_close") {
        let Some(detail) = event["detail"].as_str() else {
            continue;
        };
        let reason = event["reason"].as_str().unwrap_or("?");
        // Numbers vary per session; the shape of the message is the key.
        let shape: String = detail
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(120)
            .collect();
        *counts.entry(format!("{reason}: {shape}")).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    counts
}

/// Stops an agent and returns its audit events (complete after the stop).
pub fn stop_agent(mut agent: Agent) -> Result<Vec<Value>> {
    agent.stop()?;
    Ok(agent.audit_events()?)
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let ticks = super::cpu::own_ticks(&stat).with_context(|| format!("parse {path}"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(ticks as f64 / hz as f64)
}

/// What a tcpgate turn's audit log says about the path its bytes took.
#[derive(Debug, Default)]
pub struct PathReport {
    /// Set when the bytes did not take the path the contender claims.
    pub warning: Option<String>,
    /// Share of the bytes the agent copied under backpressure (eBPF path).
    pub backpressure_share: Option<f64>,
}

/// Stops a tcpgate agent (so its audit log is complete) and checks which
/// path moved the bytes.
pub fn stop_and_check(contender: Contender, running: Running) -> Result<PathReport> {
    let Running::Agent(mut agent) = running else {
        return Ok(PathReport::default());
    };
    agent.stop()?;
    let check = PathCheck::from_events(&agent.audit_events()?);
    let total = check.kernel_bytes + check.userspace_bytes;
    let share = |bytes: u64| {
        if total == 0 {
            0.0
        } else {
            bytes as f64 / total as f64
        }
    };
    let kernel_share = share(check.kernel_bytes);
    // Bytes copied under backpressure are the kernel path working as
    // designed (the receiver was slower than the sender); anything else
    // copied means a session fell back to user space.
    let designed_share = share(check.kernel_bytes + check.backpressure_bytes);
    let expected_kernel = matches!(contender, Contender::TcpgateEbpf | Contender::TcpgateRouted);
    let odd = check.sessions == 0
        || (expected_kernel && designed_share < 0.99)
        || (!expected_kernel && kernel_share > 0.0);
    let warning = odd.then(|| {
        format!(
            "{}: {} sessions, {:.1}% of {} bytes in the kernel, {:.1}% copied under backpressure; agent log tail:\n{}",
            contender.name(),
            check.sessions,
            kernel_share * 100.0,
            total,
            share(check.backpressure_bytes) * 100.0,
            agent.logs_tail(10)
        )
    });
    Ok(PathReport {
        warning,
        backpressure_share: expected_kernel.then(|| share(check.backpressure_bytes)),
    })
}

/// The address the target's servers bind: every port on the target address.
pub fn target_bind(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(TARGET_V4), port)
}

/// A scratch directory for configs and logs of one bench run.
pub fn work_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("tg-bench-")
        .tempdir()
        .context("cannot create the bench's scratch directory")
}
