//! What `cargo xtask install` puts on a bastion, running: the staged binary
//! end to end, the unit's capability set as the only privileges of a
//! non-root agent (enough, and each one needed), and the installed unit
//! under a real systemd.
//!
//! Users, groups, namespaces and the throwaway systemd are unique per test
//! and removed on drop, so the tests run in parallel.

mod common;
#[allow(dead_code, reason = "shared with install.rs")]
mod install_support;

use std::collections::BTreeSet;
use std::io::{Read, Write};

use anyhow::{Context, Result, ensure};
use common::auth::{AuthFixture, Launch, authenticate, echo_service, policy};
use common::wait_events;
use install_support::systemd::Container;
use install_support::unprivileged::{Privileges, Wrapper, capability_set, ids};
use install_support::{Staged, TestUser};
use tcpgate_tests::require_root;

/// Sends `payload` through an admitted stream and checks the echo.
fn echo_through(stream: &mut std::net::TcpStream, payload: &[u8]) -> Result<()> {
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back)?;
    ensure!(back == payload, "echo through the agent");
    Ok(())
}

/// The session went through the kernel splice: every byte counted by the
/// verdict program, none copied by the agent.
fn ensure_spliced(event: &serde_json::Value, len: u64) -> Result<()> {
    ensure!(event["datapath"] == "ebpf", "data path: {event}");
    ensure!(
        event["kernel_bytes_up"] == len && event["kernel_bytes_down"] == len,
        "kernel byte counters: {event}"
    );
    ensure!(
        event["userspace_bytes_up"] == 0 && event["userspace_bytes_down"] == 0,
        "no user-space copy: {event}"
    );
    Ok(())
}

/// The staged binary is a working tcpgate: runner → bastion → target with a
/// token preamble, then with a grant asked for by the staged CLI and a plain
/// client; both sessions spliced in the kernel.
#[test]
fn staged_binary_serves_authenticated_sessions_end_to_end() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let staged = Staged::new()?;
    let launch = Launch {
        binary: Some(staged.binary()),
        prepare: None,
    };
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    ensure!(
        fx.agent.binary() == staged.binary(),
        "the agent is the staged binary"
    );
    let server = echo_service(&fx, b"")?;

    let payload = b"through the staged binary, token in band";
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &fx.token())?;
    ensure!(status == 0, "preamble denied: {message}");
    echo_through(&mut stream, payload)?;
    drop(stream);

    let grant = fx.grant_from_runner(&fx.token(), &[])?;
    let mut plain = fx.dial_from_runner(AuthFixture::target(9000))?;
    echo_through(&mut plain, payload)?;
    drop(plain);

    let closed = wait_events(&fx.agent, "session_close", 2)?;
    for event in &closed {
        ensure_spliced(event, payload.len() as u64)?;
    }
    ensure!(
        closed.iter().any(|e| e["grant_id"] == grant.as_str()),
        "one session ran under the CLI's grant {grant}: {closed:?}"
    );
    server.stop()?;
    Ok(())
}

/// An echo server on the target's port 22: interception of a low port must
/// not need CAP_NET_BIND_SERVICE (sk_lookup steers it to the agent's 15001).
fn ssh_port_echo(fx: &AuthFixture) -> Result<tcpgate_tests::AcceptLoop<()>> {
    ssh_port_echo_at(&fx.topo)
}

fn ssh_port_echo_at(topo: &tcpgate_tests::Topology) -> Result<tcpgate_tests::AcceptLoop<()>> {
    Ok(tcpgate_tests::accept_loop(
        &topo.target,
        AuthFixture::target(22),
        10,
        |mut stream, _| {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        },
    )?)
}

/// The proof that the unit's capability list is enough: the staged agent,
/// started like the unit starts it (an unprivileged user, the operators'
/// group, only the unit's capabilities in every set, no-new-privileges),
/// loads eBPF, installs interception through `ip`, admits a token and
/// splices the session in the kernel; on SIGTERM it removes its routes.
#[test]
fn unit_capabilities_let_a_non_root_agent_intercept_and_splice() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let staged = Staged::new()?;
    let caps = staged.unit()?.capabilities()?;
    let user = TestUser::create()?;
    let wrapper = Wrapper::new(&staged.binary(), &user, &Privileges::unit(&caps))?;
    let mut fx = AuthFixture::start_launched(&policy("15m"), &[], wrapper.launch(&user))?;

    let pid = fx.agent.pid();
    ensure!(
        ids(pid, "Uid")? == vec![user.uid; 4],
        "the agent runs as {}",
        user.name
    );
    ensure!(
        ids(pid, "Groups")?.contains(&user.extra_gid),
        "in the operators' group"
    );
    for field in ["CapEff", "CapPrm", "CapAmb", "CapBnd"] {
        let held = capability_set(pid, field)?;
        ensure!(
            held == caps,
            "{field} is {held:?}, the unit grants {caps:?}"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(status.contains("NoNewPrivs:\t1"), "no-new-privileges");
    ensure!(
        !common::routing_leftovers(&fx.topo.bastion)?.is_empty(),
        "the agent's `ip` child installed the interception rules"
    );

    let server = ssh_port_echo(&fx)?;
    let payload = b"spliced for an unprivileged agent";
    let mut stream = fx.dial_from_runner(AuthFixture::target(22))?;
    let (status, message) = authenticate(&mut stream, &fx.token())?;
    ensure!(
        status == 0,
        "preamble denied: {message}\n{}",
        fx.agent.logs_tail(20)
    );
    echo_through(&mut stream, payload)?;
    drop(stream);
    let closed = wait_events(&fx.agent, "session_close", 1)?;
    ensure_spliced(&closed[0], payload.len() as u64)?;
    ensure!(closed[0]["destination"] == "192.0.2.10:22", "{}", closed[0]);
    server.stop()?;

    let exit = fx.agent.stop()?;
    ensure!(
        exit.success(),
        "clean stop: {exit}\n{}",
        fx.agent.logs_tail(20)
    );
    let left = common::routing_leftovers(&fx.topo.bastion)?;
    ensure!(left.is_empty(), "routes and rules left behind: {left:?}");
    Ok(())
}

/// Each capability of the unit is needed: without any one of them the agent
/// does not start, and says why. Without CAP_PERFMON, the most surprising
/// one, the verifier itself explains.
#[test]
fn dropping_any_unit_capability_stops_startup_with_a_clear_error() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let staged = Staged::new()?;
    let caps = staged.unit()?.capabilities()?;
    let user = TestUser::create()?;
    for dropped in &caps {
        let fewer: BTreeSet<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let wrapper = Wrapper::new(&staged.binary(), &user, &Privileges::unit(&fewer))?;
        let started = AuthFixture::start_launched(&policy("15m"), &[], wrapper.launch(&user));
        let Err(err) = started else {
            anyhow::bail!("the agent started without {dropped}");
        };
        let Some(tcpgate_tests::AgentError::ExitedEarly { stderr_tail, .. }) =
            err.downcast_ref::<tcpgate_tests::AgentError>()
        else {
            anyhow::bail!("without {dropped}: expected an early exit, got {err:#}");
        };
        let expected: &[&str] = match dropped.as_str() {
            // The verifier refuses map-value pointer arithmetic to programs
            // loaded without CAP_PERFMON (which program comes first varies).
            "CAP_PERFMON" => &["prohibited for !root", "Permission denied"],
            "CAP_BPF" | "CAP_NET_ADMIN" => &["failed to create map", "Operation not permitted"],
            other => anyhow::bail!("no expectation for {other}"),
        };
        for text in expected {
            ensure!(
                stderr_tail.contains(text),
                "without {dropped}, the error should say {text:?}:\n{stderr_tail}"
            );
        }
    }
    Ok(())
}

/// Why the unit grants ambient capabilities rather than putting them on the
/// binary: with the same three as file capabilities (which also means
/// giving up no-new-privileges), the agent loads eBPF, but the `ip` it runs
/// for policy routing gets none, and interception cannot be set up.
#[test]
fn file_capabilities_do_not_reach_the_agents_ip_commands() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt as _;
    let staged = Staged::new()?;
    let caps = staged.unit()?.capabilities()?;
    let user = TestUser::create()?;
    let dir = tempfile::Builder::new().prefix("tg-filecaps-").tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let binary = dir.path().join("tcpgate");
    std::fs::copy(staged.binary(), &binary)?;
    let names: Vec<String> = caps.iter().map(|c| c.to_ascii_lowercase()).collect();
    let setcap = std::process::Command::new("setcap")
        .arg(format!("{}+ep", names.join(",")))
        .arg(&binary)
        .status()
        .context("run setcap (libcap2-bin)")?;
    ensure!(setcap.success(), "setcap failed");
    let privileges = Privileges {
        ambient: BTreeSet::new(),
        bounding: caps,
        no_new_privs: false,
    };
    let wrapper = Wrapper::new(&binary, &user, &privileges)?;
    let started = AuthFixture::start_launched(&policy("15m"), &[], wrapper.launch(&user));
    let Err(err) = started else {
        anyhow::bail!("the agent started with file capabilities only");
    };
    let Some(tcpgate_tests::AgentError::ExitedEarly { stderr_tail, .. }) =
        err.downcast_ref::<tcpgate_tests::AgentError>()
    else {
        anyhow::bail!("expected an early exit, got {err:#}");
    };
    ensure!(
        stderr_tail.contains("cannot install interception")
            && stderr_tail.contains("RTNETLINK answers: Operation not permitted"),
        "eBPF loaded, then `ip` lacked CAP_NET_ADMIN:\n{stderr_tail}"
    );
    Ok(())
}

/// The agent's configuration inside the container: the example's layout
/// (pins, audit log, operator group) with this test's JWKS and addresses.
fn container_config(jwks_url: &str) -> String {
    use tcpgate_tests::tokens::{AUDIENCE, ISSUER};
    let ports: Vec<String> = common::auth::PORTS
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect();
    format!(
        "[agent]\ndatapath = \"ebpf\"\npin_dir = \"/sys/fs/bpf/tcpgate\"\n\
         operator_group = \"tcpgate-operators\"\n\n\
         [audit]\npath = \"/var/log/tcpgate/audit.jsonl\"\n\n\
         [admin]\nlisten = \"127.0.0.1:9470\"\n\n[api]\nlisten = \"198.51.100.1:8080\"\n\n\
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
    let keys = common::auth::Keys::new();
    let jwks = JwksServer::start(&topo.bastion, "127.0.0.1:0".parse()?, keys.jwks())?;
    let container = Container::boot(&topo.bastion.path())?;

    // The container sees the host's root file system (not its other mounts,
    // such as /tmp): copy the binaries under test in, next to the checkout.
    let workspace = tcpgate_tests::agent::workspace_root();
    ensure!(
        container
            .path(&workspace.join("packaging").display().to_string())
            .is_dir(),
        "the checkout must be on the root file system to be seen by the container"
    );
    std::fs::copy(
        tcpgate_tests::agent::agent_binary()?,
        container.path("/var/tmp/tcpgate"),
    )?;
    std::fs::copy(
        install_support::xtask_binary()?,
        container.path("/var/tmp/xtask"),
    )?;
    let installed =
        container.run(&["/var/tmp/xtask", "install", "--binary", "/var/tmp/tcpgate"])?;
    ensure!(
        installed.contains("accounts tcpgate, tcpgate-operators ... created")
            && installed.contains("$ systemctl daemon-reload"),
        "a real install:\n{installed}"
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

    let server = ssh_port_echo_at(&topo)?;
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

    container.run(&["systemctl", "reload", "tcpgate.service"])?;
    ensure!(container.property("tcpgate.service", "ActiveState")? == "active");
    ensure!(
        container
            .journal("tcpgate.service")
            .contains("reloaded the intercepted set")
    );
    // A bad file on reload changes nothing; the agent keeps serving.
    let config = container.path("/etc/tcpgate/tcpgate.toml");
    let good = std::fs::read_to_string(&config)?;
    std::fs::write(&config, format!("{good}\n[agent.typo]\n"))?;
    container.run(&["systemctl", "reload", "tcpgate.service"])?;
    ensure!(container.property("tcpgate.service", "ActiveState")? == "active");
    ensure!(
        container
            .journal("tcpgate.service")
            .contains("reload rejected")
    );

    container.run(&["systemctl", "stop", "tcpgate.service"])?;
    let left = common::routing_leftovers(&topo.bastion)?;
    ensure!(
        left.is_empty(),
        "routes and rules left after stop: {left:?}\n{}",
        container.journal("tcpgate.service")
    );
    let pins: Vec<_> = std::fs::read_dir(container.path("/sys/fs/bpf/tcpgate"))?.collect();
    ensure!(pins.is_empty(), "pins left after stop: {pins:?}");

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
        container
            .exec(&["getent", "passwd", "tcpgate"])?
            .status
            .code()
            == Some(2)
    );
    Ok(())
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
    let listed = container.run(&[
        "setpriv",
        "--reuid=tgop",
        "--regid=tgop",
        "--init-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        "/usr/local/bin/tcpgate",
        "sessions",
        "--json",
        "--sample",
        "0s",
    ])?;
    let doc: serde_json::Value =
        serde_json::from_str(&listed).with_context(|| format!("sessions JSON: {listed}"))?;
    let sessions = doc["sessions"].as_array().context("sessions array")?;
    ensure!(
        sessions.len() == 1 && sessions[0]["destination"] == "192.0.2.10:22",
        "the operator sees the one live session: {listed}"
    );
    Ok(())
}
