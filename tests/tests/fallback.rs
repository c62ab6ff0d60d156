//! The user-space fallback is chosen automatically, with a clear warning,
//! when eBPF cannot load; `--datapath ebpf` then refuses to start.
//!
//! The agent runs as root but without the capabilities bpf() needs
//! (CAP_BPF, CAP_SYS_ADMIN, CAP_PERFMON dropped from its bounding set), the
//! situation of an unprivileged agent or a kernel without BPF.

use anyhow::{Context, Result, ensure};
use tcpgate_tests::topology::{BASTION_RUNNER_V4, TARGET_V4};
use tcpgate_tests::{
    Agent, Payload, Topology, read_to_end_hashed, require_root, serve_once, write_payload,
};
use tcpgate_tests::{DataPath, LISTEN_PORT, UPSTREAM_PORT};

/// A wrapper that execs the agent without bpf() privileges.
fn unprivileged_wrapper(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let agent = tcpgate_tests::agent::agent_binary()?;
    let path = dir.join("tcpgate-without-bpf");
    let script = format!(
        "#!/bin/sh\nexec setpriv --bounding-set=-bpf,-sys_admin,-perfmon --inh-caps=-bpf,-sys_admin,-perfmon {} \"$@\"\n",
        agent.display()
    );
    tcpgate_tests::write_executable(&path, script.as_bytes(), 0o755)?;
    Ok(path)
}

fn config(builder: &tcpgate_tests::AgentBuilder<'_>, datapath: &str) -> String {
    format!(
        "auth = \"none\"\n[agent]\ndatapath = \"{datapath}\"\npin_dir = {:?}\n[audit]\npath = {:?}\n\
         [[forward]]\nlisten = \"{BASTION_RUNNER_V4}:{LISTEN_PORT}\"\nupstream = \"{TARGET_V4}:{UPSTREAM_PORT}\"\n",
        builder.pin_dir().display().to_string(),
        builder.audit_path().display().to_string()
    )
}

#[test]
fn auto_falls_back_to_userspace_with_a_warning() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let dir = tempfile::tempdir()?;
    let builder = Agent::builder(&topo.bastion)?.binary(unprivileged_wrapper(dir.path())?);
    let text = config(&builder, "auto");
    let agent = builder.config(text).spawn()?;
    let logs = agent.logs();
    ensure!(
        logs.contains("falling back to the user-space copy"),
        "no fallback warning:\n{logs}"
    );
    ensure!(
        logs.contains("Operation not permitted") || logs.contains("CAP_BPF"),
        "the warning says why:\n{logs}"
    );

    let payload = Payload::new(3, 8 << 20);
    let server = serve_once(
        &topo.target,
        format!("{TARGET_V4}:{UPSTREAM_PORT}").parse()?,
        |mut stream, _| read_to_end_hashed(&mut stream),
    )?;
    let addr = format!("{BASTION_RUNNER_V4}:{LISTEN_PORT}").parse()?;
    let mut client = tcpgate_tests::dial(&topo.runner, addr)?;
    write_payload(&mut client, &payload)?;
    client.shutdown(std::net::Shutdown::Write)?;
    let (len, digest) = server.join()??;
    ensure!(
        len == payload.len && digest == payload.digest(),
        "byte-exact through the fallback"
    );
    drop(client);
    let closed = &tcpgate_tests::wait_events(&agent, "session_close", 1)?[0];
    tcpgate_tests::assert_bytes(DataPath::Userspace, closed, payload.len, 0)?;
    Ok(())
}

#[test]
fn forced_ebpf_fails_clearly_without_privileges() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let dir = tempfile::tempdir()?;
    let builder = Agent::builder(&topo.bastion)?.binary(unprivileged_wrapper(dir.path())?);
    let text = config(&builder, "ebpf");
    let pin_dir = builder.pin_dir().to_owned();
    match builder.config(text).spawn() {
        Ok(_) => anyhow::bail!("the agent started without bpf() privileges"),
        Err(tcpgate_tests::AgentError::ExitedEarly {
            status,
            stderr_tail,
            ..
        }) => {
            ensure!(status.code() == Some(1), "exit status {status:?}");
            ensure!(
                stderr_tail.contains("the eBPF data path was requested"),
                "{stderr_tail}"
            );
            ensure!(
                stderr_tail.contains("Operation not permitted"),
                "says why: {stderr_tail}"
            );
            ensure!(
                !pin_dir.exists(),
                "a failed start leaves no pin directory behind"
            );
        }
        Err(other) => anyhow::bail!("unexpected failure: {other}"),
    }
    Ok(())
}

#[test]
fn wrapper_really_drops_capabilities() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let wrapper = unprivileged_wrapper(dir.path())?;
    let script = std::fs::read_to_string(&wrapper)?;
    let setpriv = script
        .lines()
        .nth(1)
        .context("exec line")?
        .replace("exec ", "");
    let probe = setpriv
        .split(" /")
        .next()
        .context("setpriv part")?
        .to_owned()
        + " grep CapEff /proc/self/status";
    let out = std::process::Command::new("sh")
        .args(["-c", &probe])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mask = u64::from_str_radix(text.trim().trim_start_matches("CapEff:").trim(), 16)?;
    for (bit, name) in [(21, "CAP_SYS_ADMIN"), (38, "CAP_PERFMON"), (39, "CAP_BPF")] {
        ensure!(mask & (1 << bit) == 0, "{name} still effective: {text}");
    }
    ensure!(mask & (1 << 12) != 0, "CAP_NET_ADMIN kept: {text}");
    Ok(())
}
