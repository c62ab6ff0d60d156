//! The installed unit under a real systemd: `cargo xtask install` on a
//! throwaway system (see tests/src/install/systemd.rs), then `systemctl`.

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::{authenticate, policy};
use tcpgate_tests::install::session::{echo_on_port_22, echo_through, ensure_spliced};
use tcpgate_tests::install::systemd::Container;
use tcpgate_tests::require_root;

mod install_systemd {
    pub mod upgrade;
}
use install_systemd::upgrade;

/// The agent's configuration inside the container: the example's layout
/// (pins, audit log, operator group) with this test's JWKS and addresses.
fn container_config(jwks_url: &str) -> String {
    use tcpgate_tests::tokens::{AUDIENCE, ISSUER};
    let ports: Vec<String> = tcpgate_tests::auth_fixture::PORTS
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect();
    format!(
        "[agent]\ndatapath = \"ebpf\"\npin_dir = \"/sys/fs/bpf/tcpgate\"\n\
         operator_group = \"tcpgate-operators\"\n\n\
         [audit]\npath = \"/var/log/tcpgate/audit.jsonl\"\n\n\
         [admin]\n\n[api]\nlisten = \"198.51.100.1:8080\"\ninsecure_http = true\n\n\
         [intercept]\n[[intercept.prefix]]\nprefix = \"192.0.2.0/24\"\nports = [{ports}]\n\n\
         [auth]\naudit_claims = [\"project_path\"]\n[[auth.issuer]]\nissuer = {ISSUER:?}\n\
         audience = {AUDIENCE:?}\njwks_url = {jwks_url:?}\nca_file = \"/etc/tcpgate/jwks-ca.pem\"\n\
         {policy}",
        ports = ports.join(", "),
        policy = policy("15m"),
    )
}

/// A uid or gid of the container's accounts.
fn container_id(container: &Container, database: &str, name: &str) -> Result<u32> {
    let line = container.run(&["getent", database, name])?;
    line.split(':')
        .nth(2)
        .and_then(|id| id.trim().parse().ok())
        .with_context(|| format!("getent {database} {name}: {line}"))
}

/// The installed unit under a real systemd (252, Debian's): `cargo xtask
/// install` on the running system (accounts, log directory, daemon-reload),
/// `systemctl enable --now` returning once the agent is READY, the sandbox
/// and identity the unit describes, a token-authenticated session spliced
/// in the kernel, reload, stop with routes and pins removed, uninstall.
#[test]
fn systemd_runs_the_installed_unit() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    use tcpgate_tests::jwks_server::JwksServer;
    let topo = tcpgate_tests::Topology::new()?;
    let keys = tcpgate_tests::auth_fixture::Keys::new();
    let jwks = JwksServer::start(&topo.bastion, "127.0.0.1:0".parse()?, keys.jwks())?;
    let container = Container::boot(&topo.bastion.path())?;

    // The container sees the host's root file system, but its own tmpfs on
    // /tmp (and not the host's other mounts): a checkout it cannot see (a
    // clone under /tmp, say) gets its packaging/ copied in, where `xtask
    // install` looks for it.
    let workspace = tcpgate_tests::agent::workspace_root();
    let packaging = workspace.join("packaging");
    let inside = container.path(&packaging.display().to_string());
    if !inside.is_dir() {
        copy_tree(&packaging, &inside)?;
    }
    std::fs::copy(
        tcpgate_tests::agent::agent_binary()?,
        container.path("/var/tmp/tcpgate"),
    )?;
    std::fs::copy(
        tcpgate_tests::install::xtask_binary()?,
        container.path("/var/tmp/xtask"),
    )?;
    let installed =
        container.run(&["/var/tmp/xtask", "install", "--binary", "/var/tmp/tcpgate"])?;
    ensure!(
        installed.contains("accounts tcpgate, tcpgate-operators ... created")
            && installed.contains("$ systemctl daemon-reload"),
        "a real install:\n{installed}"
    );
    ensure!(
        installed.contains("guard table inet tcpgate_guard drops 1 prefix(es)")
            && container
                .exec(&["nft", "list", "table", "inet", "tcpgate_guard"])?
                .status
                .success(),
        "install puts the guard table in place before the service runs:\n{installed}"
    );
    // The example, as installed, on the system whose accounts install made.
    let checked = container.run(&["/usr/local/bin/tcpgate", "check-config"])?;
    ensure!(checked.contains("valid"), "check-config: {checked}");

    std::fs::copy(jwks.ca_file(), container.path("/etc/tcpgate/jwks-ca.pem"))?;
    std::fs::write(
        container.path("/etc/tcpgate/tcpgate.toml"),
        container_config(&jwks.url()),
    )?;
    let started = container.exec(&["systemctl", "enable", "--now", "tcpgate.service"])?;
    ensure!(
        started.status.success(),
        "systemctl enable --now: {}\n{}",
        String::from_utf8_lossy(&started.stderr),
        container.journal("tcpgate.service")
    );
    // Type=notify: `start` returned after READY=1.
    ensure!(container.property("tcpgate.service", "ActiveState")? == "active");
    ensure!(container.property("tcpgate.service", "SubState")? == "running");
    ensure!(
        container.property("tcpgate.service", "StatusText")? == "serving on the ebpf data path",
        "{}",
        container.journal("tcpgate.service")
    );

    let main_pid = container.property("tcpgate.service", "MainPID")?;
    let status = std::fs::read_to_string(container.path(&format!("/proc/{main_pid}/status")))?;
    let uid = container_id(&container, "passwd", "tcpgate")?;
    let operators = container_id(&container, "group", "tcpgate-operators")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    ensure!(
        field("Uid") == format!("{uid}\t{uid}\t{uid}\t{uid}"),
        "Uid: {}",
        field("Uid")
    );
    ensure!(
        field("Groups")
            .split_whitespace()
            .any(|g| g == operators.to_string())
    );
    ensure!(field("CapEff") == field("CapBnd") && field("CapAmb") == field("CapBnd"));
    ensure!(
        field("CapBnd") == "000000c000001000",
        "only BPF, NET_ADMIN, PERFMON: {status}"
    );
    ensure!(
        field("NoNewPrivs") == "1" && field("Seccomp") == "2",
        "{status}"
    );

    let server = echo_on_port_22(&topo)?;
    let payload = b"spliced under systemd";
    let mut stream = topo
        .runner
        .run(|| std::net::TcpStream::connect(("192.0.2.10", 22)))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    let token = keys.rsa.sign(&tcpgate_tests::tokens::gitlab_claims());
    let (status, message) = authenticate(&mut stream, &token)?;
    ensure!(
        status == 0,
        "denied: {message}\n{}",
        container.journal("tcpgate.service")
    );
    echo_through(&mut stream, payload)?;
    operator_sees_the_session(&container)?;
    drop(stream);
    let audit = container.path("/var/log/tcpgate/audit.jsonl");
    let closed = tcpgate_tests::wait_for_audit(
        &audit,
        |e| e["event"] == "session_close",
        std::time::Duration::from_secs(30),
    )?;
    ensure_spliced(&closed, payload.len() as u64)?;
    server.stop()?;
    check_files_the_agent_made(&container, uid, operators)?;

    // A plain config reload: SIGHUP, forwarded by the supervisor.
    let hup = [
        "systemctl",
        "kill",
        "--kill-whom=main",
        "--signal=SIGHUP",
        "tcpgate.service",
    ];
    container.run(&hup)?;
    reloaded(&container, "reloaded the intercepted set")?;
    // A bad file on reload changes nothing; the agent keeps serving.
    let config = container.path("/etc/tcpgate/tcpgate.toml");
    let good = std::fs::read_to_string(&config)?;
    std::fs::write(&config, format!("{good}\n[agent.typo]\n"))?;
    container.run(&hup)?;
    reloaded(&container, "reload rejected")?;
    // Nor does a takeover (`systemctl reload`) whose successor refuses it.
    upgrade::failed_takeover_keeps_the_old_agent(&container)?;
    std::fs::write(&config, &good)?;
    upgrade::install_upgrades_under_a_live_session(&topo, &container, &keys)?;
    upgrade::pre_supervise_unit_is_told_to_restart(&container)?;

    container.run(&["systemctl", "stop", "tcpgate.service"])?;
    upgrade::stopped_cleanly(&container)?;
    let left = tcpgate_tests::routing_leftovers(&topo.bastion)?;
    ensure!(
        left.is_empty(),
        "routes and rules left after stop: {left:?}\n{}",
        container.journal("tcpgate.service")
    );
    let pins: Vec<_> = std::fs::read_dir(container.path("/sys/fs/bpf/tcpgate"))?.collect();
    ensure!(pins.is_empty(), "pins left after stop: {pins:?}");

    std::fs::write(&config, format!("{good}\n[agent.typo]\n"))?;
    // Started with the bad file, the agent exits 64 and is not restarted.
    let start = container.exec(&["systemctl", "start", "tcpgate.service"])?;
    ensure!(!start.status.success(), "a bad config must not start");
    ensure!(container.property("tcpgate.service", "ExecMainStatus")? == "64");
    ensure!(
        container.property("tcpgate.service", "SubState")? == "failed",
        "no restart after a config error: {}",
        container.property("tcpgate.service", "SubState")?
    );

    let removed = container.run(&["/var/tmp/xtask", "uninstall", "--purge"])?;
    ensure!(
        !container
            .path("/usr/local/lib/systemd/system/tcpgate.service")
            .exists()
    );
    ensure!(!container.path("/var/log/tcpgate").exists(), "{removed}");
    ensure!(
        removed.contains("guard table inet tcpgate_guard removed")
            && !container
                .exec(&["nft", "list", "table", "inet", "tcpgate_guard"])?
                .status
                .success(),
        "uninstall removes the guard table:\n{removed}"
    );
    ensure!(
        container
            .exec(&["getent", "passwd", "tcpgate"])?
            .status
            .code()
            == Some(2)
    );
    Ok(())
}

/// The reload finished (the unit is `active` again, not `reloading`) and
/// the agent logged `message`.
fn reloaded(container: &Container, message: &str) -> Result<()> {
    container.wait_until(&format!("{message:?} after reload"), |c| {
        Ok(c.property("tcpgate.service", "ActiveState")? == "active"
            && c.journal("tcpgate.service").contains(message))
    })
}

/// Owners and modes of what the running service created: the pin directory
/// (unit's ExecStartPre), the pinned maps and the audit log (UMask=0027).
fn check_files_the_agent_made(container: &Container, uid: u32, operators: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = |path: &str| std::fs::metadata(container.path(path));
    let bpffs = meta("/sys/fs/bpf")?;
    ensure!(
        bpffs.mode() & 0o001 != 0,
        "operators may traverse /sys/fs/bpf"
    );
    let pins = meta("/sys/fs/bpf/tcpgate")?;
    ensure!(
        (pins.uid(), pins.gid(), pins.mode() & 0o7777) == (uid, operators, 0o750),
        "pin directory: {}:{} {:o}",
        pins.uid(),
        pins.gid(),
        pins.mode() & 0o7777
    );
    let log = meta("/var/log/tcpgate/audit.jsonl")?;
    ensure!(
        log.uid() == uid && log.mode() & 0o007 == 0,
        "audit log owned by tcpgate, nothing for others: {:o}",
        log.mode() & 0o7777
    );
    Ok(())
}

/// A member of tcpgate-operators, without root or capabilities, lists the
/// live session from the pinned maps: the install's groups, the unit's pin
/// directory and its `o+x` on /sys/fs/bpf (mounted 0700 here, as systemd
/// mounts it) are what make that work.
fn operator_sees_the_session(container: &Container) -> Result<()> {
    container.run(&[
        "useradd",
        "--system",
        "--groups",
        "tcpgate-operators",
        "tgop",
    ])?;
    let as_operator = [
        "setpriv",
        "--reuid=tgop",
        "--regid=tgop",
        "--init-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ];
    let (sessions, listed) = upgrade::sessions(container, &as_operator)?;
    ensure!(
        sessions.len() == 1 && sessions[0]["destination"] == "192.0.2.10:22",
        "the operator sees the one live session: {listed}"
    );
    // The operator socket: the unit's RuntimeDirectory, the agent's mode
    // and group; the member reaches the API through it.
    let socket = container.run(&["stat", "-c", "%a %U %G", "/run/tcpgate/admin.sock"])?;
    ensure!(
        socket.trim() == "660 tcpgate tcpgate-operators",
        "operator socket: {socket}"
    );
    let grants = container.run(&[
        "setpriv",
        "--reuid=tgop",
        "--regid=tgop",
        "--init-groups",
        "--",
        "/usr/local/bin/tcpgate",
        "grants",
        "--json",
    ])?;
    let doc: serde_json::Value =
        serde_json::from_str(&grants).with_context(|| format!("grants JSON: {grants}"))?;
    ensure!(
        doc["source"] == "api",
        "a member lists grants over the socket: {doc}"
    );
    Ok(())
}

/// Copies a directory tree (files and directories only).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}
