//! Real clients and servers from Debian's packages through the bastion:
//! `psql` against PostgreSQL with a source-bound grant (no preamble, the
//! client is unmodified), and OpenSSH with `tcpgate connect` as its
//! `ProxyCommand` (a preamble per connection), also under rsync and git, and
//! how `tcpgate connect` ends when its session does.

mod real_clients {
    pub mod connect_end;
    pub mod first_deployment;
    pub mod ssh;
    pub mod ssh_tools;
}

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::AuthFixture;
use tcpgate_tests::wait_events;
use tcpgate_tests::{ChildGuard, Netns, require_root};

/// Debian's PostgreSQL server binaries (`/usr/lib/postgresql/<major>/bin`).
fn postgres_bin(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt install postgresql)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .collect();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .with_context(|| format!("no {name}"))
}

/// Waits until something accepts TCP connections on `addr` inside `ns`.
pub fn wait_listening(ns: &Netns, addr: SocketAddr, what: &str) -> Result<()> {
    Ok(tcpgate_tests::clients::wait_listening(
        ns,
        addr,
        what,
        Duration::from_secs(30),
    )?)
}

/// A throwaway PostgreSQL cluster in the target namespace, run as the
/// `postgres` system user (the server refuses to run as root).
fn start_postgres(ns: &Netns, dir: &Path) -> Result<ChildGuard> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let status = std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&data)
        .status()?;
    ensure!(status.success(), "chown data dir");
    let initdb = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(postgres_bin("initdb")?)
        .args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "--no-sync"])
        .output()?;
    ensure!(
        initdb.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&initdb.stderr)
    );
    // The server sees the bastion's address: the agent connects upstream.
    let mut hba = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("pg_hba.conf"))?;
    std::io::Write::write_all(&mut hba, b"host all all 192.0.2.0/24 trust\n")?;
    let mut server = ns.command("runuser");
    server
        .args(["-u", "postgres", "--"])
        .arg(postgres_bin("postgres")?)
        .arg("-D")
        .arg(&data)
        .args([
            "-c",
            "listen_addresses=192.0.2.10",
            "-c",
            "port=5432",
            "-c",
            "fsync=off",
        ])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", data.display()));
    let child = ChildGuard::spawn_logged(&mut server, dir, "postgres")?;
    wait_listening(ns, AuthFixture::target(5432), "PostgreSQL")?;
    Ok(child)
}

#[test]
fn psql_through_a_source_grant() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let dir = tempfile::tempdir()?;
    let _postgres = start_postgres(&fx.topo.target, dir.path())?;
    let grant = fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=5432"])?;
    let output = fx
        .topo
        .runner
        .command("psql")
        .args([
            "-h",
            "192.0.2.10",
            "-p",
            "5432",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            "select 6 * 7",
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()?;
    ensure!(
        output.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&output.stdout).trim() == "42",
        "psql answered {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["grant_id"] == grant.as_str() && closed["destination"] == "192.0.2.10:5432",
        "{closed}"
    );
    ensure!(
        closed["kernel_bytes_up"].as_u64() > Some(0) && closed["userspace_bytes_up"] == 0,
        "{closed}"
    );
    ensure!(
        closed["kernel_bytes_down"].as_u64() > Some(0) && closed["userspace_bytes_down"] == 0,
        "{closed}"
    );
    Ok(())
}

#[test]
fn ssh_with_tcpgate_connect_as_proxy_command() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let dir = tempfile::tempdir()?;
    let _sshd = real_clients::ssh::start_sshd(&fx.topo.target, dir.path())?;
    let token = fx.token_file(&fx.token())?;
    let proxy = format!(
        "ProxyCommand={} connect --token-file {} %h:%p",
        fx.agent.binary().display(),
        token.display()
    );
    let output = fx
        .topo
        .runner
        .command("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "ConnectTimeout=20", "-o", &proxy, "-i"])
        .arg(dir.path().join("client_key"))
        .args(["root@192.0.2.10", "echo hello-from-the-target"])
        .output()?;
    ensure!(
        output.status.success(),
        "ssh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&output.stdout).trim() == "hello-from-the-target",
        "{:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["destination"] == "192.0.2.10:22" && closed["subject"].is_string(),
        "{closed}"
    );
    ensure!(
        closed["kernel_bytes_down"].as_u64() > Some(1000),
        "ssh traffic through the kernel: {closed}"
    );
    Ok(())
}
