//! What `cargo xtask install` puts on a bastion, running: the staged binary
//! end to end, and the unit's capability set as the only privileges of a
//! non-root agent (enough, and each one needed). `install_systemd.rs` runs
//! the installed unit under a real systemd.
//!
//! Users, groups and namespaces are unique per test and removed on drop, so
//! the tests run in parallel.

use std::collections::BTreeSet;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, authenticate, echo_service, policy};
use tcpgate_tests::install::session::{echo_on_port_22, echo_through, ensure_spliced};
use tcpgate_tests::install::unprivileged::{Privileges, Wrapper, capability_set, ids};
use tcpgate_tests::install::{Staged, TestUser};
use tcpgate_tests::require_root;
use tcpgate_tests::wait_events;

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
        ..Launch::default()
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
    echo_on_port_22(&fx.topo)
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
        !tcpgate_tests::routing_leftovers(&fx.topo.bastion)?.is_empty(),
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
    let left = tcpgate_tests::routing_leftovers(&fx.topo.bastion)?;
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
/// giving up no-new-privileges), the agent loads eBPF, but the commands it
/// runs get none: the first, `nft` for the guard table, fails, and
/// interception cannot be set up.
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
            && stderr_tail.contains("`nft -f -` failed")
            && stderr_tail.contains("Operation not permitted"),
        "eBPF loaded, then `nft` lacked CAP_NET_ADMIN:\n{stderr_tail}"
    );
    Ok(())
}
