//! Fixtures for the operator tests: an intercepting agent with its admin
//! endpoint, a server that moves an exact number of bytes each way per
//! connection, and helpers to run the operator CLI.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::topology::TARGET_V4;
use crate::{AcceptLoop, AgentBuilder, Netns, Payload, Topology, accept_loop};
use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// The intercepted service port on 192.0.2.0/24.
pub const SERVICE_PORT: u16 = 9000;
/// Bytes of the per-connection header: up and down sizes, big-endian u64.
pub const HEADER: u64 = 16;

pub fn service() -> SocketAddr {
    SocketAddr::from((TARGET_V4, SERVICE_PORT))
}

/// An intercepting agent's config; `agent_extra` goes into `[agent]`.
pub fn config(builder: &AgentBuilder<'_>, agent_extra: &str) -> String {
    format!(
        "auth = \"none\"\n[agent]\npin_dir = {pin:?}\nshutdown_grace = \"1s\"\n{agent_extra}\n\n\
         [audit]\npath = {audit:?}\n\n[admin]\nsocket = {admin:?}\n\n\
         [intercept]\n[[intercept.prefix]]\nprefix = \"192.0.2.0/24\"\nports = [\"{SERVICE_PORT}\"]\n",
        pin = builder.pin_dir().display().to_string(),
        audit = builder.audit_path().display().to_string(),
        admin = admin_socket(builder.dir()).display().to_string(),
    )
}

/// An intercepting agent on the eBPF path ([`config`]), started.
pub fn start(topo: &Topology, agent_extra: &str) -> Result<crate::Agent> {
    let builder = crate::Agent::builder(&topo.bastion)?;
    let config = config(&builder, agent_extra);
    Ok(builder
        .config(config)
        .args(["--datapath", "ebpf"])
        .spawn()?)
}

/// The operator socket of an agent whose directory is `dir`.
pub fn admin_socket(dir: &Path) -> std::path::PathBuf {
    dir.join("admin.sock")
}

/// A server on the service address. Each connection starts with a header
/// naming `up` (the total the client sends, header included) and `down`;
/// the server reads exactly `up`, sends `down` bytes, then holds the
/// connection until the client closes. Returns (up read, down sent).
pub fn sized_server(topo: &Topology) -> Result<AcceptLoop<(u64, u64)>> {
    Ok(accept_loop(
        &topo.target,
        service(),
        64,
        |mut stream, _| {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
            let mut header = [0u8; 16];
            if stream.read_exact(&mut header).is_err() {
                return (0, 0);
            }
            let up = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
            let down = u64::from_be_bytes(header[8..].try_into().unwrap_or_default());
            let mut rest = up.saturating_sub(HEADER);
            let mut buf = vec![0u8; 64 * 1024];
            while rest > 0 {
                let want = usize::try_from(rest.min(buf.len() as u64)).unwrap_or(buf.len());
                match stream.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => return (up - rest, 0),
                    Ok(n) => rest -= n as u64,
                }
            }
            if crate::write_payload(&mut stream, &Payload::new(down, down)).is_err() {
                return (up, 0);
            }
            // Hold the session until the client ends it.
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            (up, down)
        },
    )?)
}

/// Sends `up` bytes (header included) on `stream` and reads the `down`
/// bytes the sized server answers; the session then stays open.
pub fn exchange(stream: &mut TcpStream, up: u64, down: u64) -> Result<()> {
    ensure!(up >= HEADER, "up must hold the header");
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&up.to_be_bytes());
    header[8..].copy_from_slice(&down.to_be_bytes());
    stream.write_all(&header)?;
    crate::write_payload(stream, &Payload::new(up, up - HEADER))?;
    let digest = crate::read_exact_hashed(stream, down)?;
    ensure!(digest == Payload::new(down, down).digest(), "reply digest");
    Ok(())
}

/// Dials the service from the runner and moves `up`/`down` bytes.
pub fn open_session(topo: &Topology, up: u64, down: u64) -> Result<TcpStream> {
    let addr = service();
    let mut stream = topo.runner.run(move || TcpStream::connect(addr))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    exchange(&mut stream, up, down).with_context(|| format!("session {up}/{down}"))?;
    Ok(stream)
}

/// Closes a session from the client side and waits for the agent's end.
pub fn close(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}

/// Whether the peer ended the connection (EOF or reset) within the read
/// timeout.
pub fn ended(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                return true;
            }
            Err(_) => return false,
        }
    }
}

/// Runs a prepared CLI command; (status, stdout, stderr).
pub fn run(mut command: Command) -> Result<(i32, String, String)> {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().context("run the tcpgate CLI")?;
    Ok((
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    ))
}

/// `tcpgate sessions --json --sample 0 --pin-dir <dir>`, parsed.
pub fn sessions_json(binary: &Path, pin_dir: &Path) -> Result<Value> {
    sessions_json_with(
        binary,
        [std::ffi::OsStr::new("--pin-dir"), pin_dir.as_os_str()],
    )
}

/// `tcpgate sessions --json --sample 0` with `args` (where to look:
/// `--config`, `--admin`, `--pin-dir`); fails unless it exits 0.
pub fn sessions_json_with<I, S>(binary: &Path, args: I) -> Result<Value>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(binary);
    command
        .args(["sessions", "--json", "--sample", "0"])
        .args(args);
    let (status, stdout, stderr) = run(command)?;
    ensure!(status == 0, "tcpgate sessions failed ({status}): {stderr}");
    let doc: Value = serde_json::from_str(&stdout).with_context(|| stdout.clone())?;
    ensure!(doc["schema"] == "tcpgate.sessions/v1", "{doc}");
    Ok(doc)
}

/// A CLI command run inside `ns` that still sees the host's bpffs.
pub fn cli_in(ns: &Netns, binary: &Path, args: &[&str]) -> Result<Command> {
    let mut command = ns.command_keep_mounts(binary)?;
    command.args(args);
    Ok(command)
}

/// Sends SIGCONT on drop, so a test failing while the agent is stopped
/// leaves a process that can still be terminated cleanly.
pub struct Continue(pub u32);

impl Drop for Continue {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A system group that exists for the test's lifetime (`groupadd`, then
/// `groupdel` on drop).
pub struct TempGroup {
    pub name: String,
    pub gid: u32,
}

impl TempGroup {
    pub fn new() -> Result<Self> {
        let name = crate::unique_name("tgop");
        let status = Command::new("groupadd")
            .args(["--system", &name])
            .status()
            .context("groupadd")?;
        ensure!(status.success(), "groupadd {name}: {status}");
        let mut group = Self { name, gid: 0 };
        group.gid = nix::unistd::Group::from_name(&group.name)?
            .context("the new group is not visible")?
            .gid
            .as_raw();
        Ok(group)
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}
