//! Fixtures shared by the integration test binaries.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod auth;
pub mod firewall;
pub mod operator;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tcpgate_tests::topology::{BASTION_RUNNER_V4, TARGET_V4};
use tcpgate_tests::{Agent, Topology, dial};

/// The two data paths; every correctness test runs on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    Ebpf,
    Userspace,
}

impl DataPath {
    pub fn flag(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Userspace => "userspace",
        }
    }
}

/// Generates one `#[test]` per data path from a `fn(DataPath) -> Result<()>`.
#[macro_export]
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn ebpf() -> anyhow::Result<()> {
                    if !tcpgate_tests::require_root() {
                        return Ok(());
                    }
                    super::$name(super::common::DataPath::Ebpf)
                }
                #[test]
                fn userspace() -> anyhow::Result<()> {
                    if !tcpgate_tests::require_root() {
                        return Ok(());
                    }
                    super::$name(super::common::DataPath::Userspace)
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
        let topo = Topology::new()?;
        let builder = Agent::builder(&topo.bastion)?;
        let config = format!(
            "auth = \"none\"\n[agent]\npin_dir = {pin:?}\ndrain_timeout = \"20s\"\n{agent}\n\n[audit]\npath = {audit:?}\n\n\
             [[forward]]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n{extra}",
            pin = builder.pin_dir().display().to_string(),
            audit = builder.audit_path().display().to_string(),
            listen = SocketAddr::from((BASTION_RUNNER_V4, LISTEN_PORT)),
            upstream = SocketAddr::from((TARGET_V4, UPSTREAM_PORT)),
        );
        let agent = builder
            .config(config)
            .args(["--datapath", path.flag()])
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
        if self.path == DataPath::Ebpf {
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
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let events: Vec<Value> = agent
            .audit_events()?
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect();
        if events.len() >= n {
            return Ok(events);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "only {} of {n} {kind} events after {timeout:?}; agent log:\n{}",
                events.len(),
                agent.logs_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn field(event: &Value, name: &str) -> Result<u64> {
    event[name]
        .as_u64()
        .with_context(|| format!("audit event lacks {name}: {event}"))
}

/// On the eBPF path every byte must have gone through the verdict program
/// (its map counters) and none through user space; on the user-space path
/// the reverse.
pub fn assert_bytes(path: DataPath, event: &Value, up: u64, down: u64) -> Result<()> {
    assert_bytes_with(path, event, up, down, false)
}

/// [`assert_bytes`] for transfers whose receiver may be slower than the
/// sender: on the kernel path the agent then copies part of the stream
/// under backpressure, and every byte it copied must be one the verdict
/// program handed over (`userspace == backpressure`, from the map).
pub fn assert_bytes_with(
    path: DataPath,
    event: &Value,
    up: u64,
    down: u64,
    backpressure: bool,
) -> Result<()> {
    ensure!(field(event, "bytes_up")? == up, "bytes_up: {event}");
    ensure!(field(event, "bytes_down")? == down, "bytes_down: {event}");
    ensure!(event["datapath"] == path.flag(), "datapath: {event}");
    let kernel = (
        field(event, "kernel_bytes_up")?,
        field(event, "kernel_bytes_down")?,
    );
    let user = (
        field(event, "userspace_bytes_up")?,
        field(event, "userspace_bytes_down")?,
    );
    match path {
        DataPath::Userspace => {
            ensure!(
                kernel == (0, 0) && user == (up, down),
                "user-space path moved bytes in the kernel: {event}"
            );
        }
        DataPath::Ebpf => {
            let handed = (
                field(event, "backpressure_bytes_up")?,
                field(event, "backpressure_bytes_down")?,
            );
            ensure!(
                user == handed,
                "the agent copied bytes the verdict program did not hand over under backpressure: {event}"
            );
            if !backpressure {
                ensure!(
                    user == (0, 0),
                    "user space copied payload on the kernel path: {event}"
                );
            }
            ensure!(
                (kernel.0 + user.0, kernel.1 + user.1) == (up, down),
                "kernel byte counters (from the eBPF session map) do not add up: {event}"
            );
            ensure!(
                up == 0 || kernel.0 > 0,
                "nothing went up through the kernel: {event}"
            );
            ensure!(
                down == 0 || kernel.1 > 0,
                "nothing went down through the kernel: {event}"
            );
        }
    }
    Ok(())
}

/// Entries of a pinned map, via Debian's bpftool.
pub fn pinned_entries(pin_dir: &Path, map: &str) -> Result<Vec<Value>> {
    let path = pin_dir.join(map);
    let output = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .context("run bpftool (apt install bpftool)")?;
    ensure!(
        output.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let entries: Vec<Value> = serde_json::from_slice(&output.stdout).context("bpftool JSON")?;
    Ok(entries)
}

pub fn assert_maps_empty(pin_dir: &Path) -> Result<()> {
    for map in ["sessions", "sockets"] {
        let entries = pinned_entries(pin_dir, map)?;
        ensure!(
            entries.is_empty(),
            "{map} map still holds {} entries: {entries:?}",
            entries.len()
        );
    }
    Ok(())
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("VmRSS")?;
    Ok(kib * 1024)
}

/// Raises this process's open-files limit (1,000 sessions need ~2,000 fds).
pub fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A real HTTP server (Debian's python3 `http.server`) serving `body` as
/// `/file.bin`, bound to `bind:port` inside `ns`.
pub struct HttpServer {
    _child: tcpgate_tests::ChildGuard,
    _dir: tempfile::TempDir,
    pub body: Vec<u8>,
}

impl HttpServer {
    pub fn start(
        ns: &tcpgate_tests::Netns,
        bind: std::net::IpAddr,
        port: u16,
        body: Vec<u8>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("file.bin"), &body)?;
        let mut command = ns.command("python3");
        command
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                &bind.to_string(),
                "--directory",
            ])
            .arg(dir.path());
        let child = tcpgate_tests::ChildGuard::spawn_logged(&mut command, dir.path(), "http")?;
        let addr = SocketAddr::new(bind, port);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while ns
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
            .is_err()
        {
            ensure!(
                std::time::Instant::now() < deadline,
                "http server on {addr} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            _child: child,
            _dir: dir,
            body,
        })
    }
}

/// Runs curl in `ns` and returns the body it fetched.
pub fn curl(ns: &tcpgate_tests::Netns, url: &str) -> Result<Vec<u8>> {
    let output = ns
        .command("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "30",
            "--noproxy",
            "*",
            url,
        ])
        .output()
        .context("run curl")?;
    ensure!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output.stdout)
}

/// The agent's configuration with interception of `prefixes`
/// (`(prefix, ports)`), written for a builder.
pub fn intercept_config(
    builder: &tcpgate_tests::AgentBuilder<'_>,
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

/// tcpgate's policy-routing state in a namespace: rules with its protocol
/// number and routes in its table.
pub fn routing_leftovers(ns: &tcpgate_tests::Netns) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for family in ["-4", "-6"] {
        let rules = ns.exec_ok(&["ip", family, "rule", "show"])?;
        left.extend(
            rules
                .lines()
                .filter(|l| l.contains("proto 213"))
                .map(|l| format!("rule {l}")),
        );
        let routes = ns.exec_ok(&["ip", family, "route", "show", "table", "all"])?;
        left.extend(
            routes
                .lines()
                .filter(|l| l.contains("proto 213"))
                .map(|l| format!("route {l}")),
        );
    }
    Ok(left)
}

/// sk_lookup links attached to a namespace (by its inode), via bpftool.
pub fn sk_lookup_links(ns: &tcpgate_tests::Netns) -> Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(ns.path())?.ino();
    let output = std::process::Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()?;
    ensure!(
        output.status.success(),
        "bpftool link show: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let links: Vec<Value> = serde_json::from_slice(&output.stdout)?;
    Ok(links
        .iter()
        .filter(|l| l["type"] == "netns" && l["netns_ino"] == inode)
        .count())
}

/// Connects from `ns` to `target` with the given source address (a second
/// runner sharing the namespace).
pub fn dial_from(
    ns: &tcpgate_tests::Netns,
    source: std::net::IpAddr,
    target: SocketAddr,
) -> Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket,
    };
    let stream = ns.run(move || -> Result<TcpStream> {
        let family = if target.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let sock = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        bind(fd, &SockaddrStorage::from(SocketAddr::new(source, 0)))?;
        connect(fd, &SockaddrStorage::from(target))?;
        Ok(TcpStream::from(sock))
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(stream)
}

/// Waits (bounded) until `done()` holds; the error names `what`.
pub fn eventually(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        if std::time::Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
