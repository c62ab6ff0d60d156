//! Takeover gone wrong: the old agent killed in the middle of a takeover
//! leaves a working successor and nothing behind, and a local user other
//! than root (or the agent's own) cannot take over (split from
//! takeover.rs, which has the takeovers that work).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::operator::{self as op, open_session, sized_server};
use tcpgate_tests::takeover::{agent_lines, echo_once, forward_fixture, stops_cleanly, successor};
use tcpgate_tests::{Agent, DataPath, Signal, Topology, agent_leftovers, require_root};

const EXIT_WAIT: Duration = Duration::from_secs(60);

/// The old agent stops answering after its offer (a test hook) and is
/// then killed: the successor gives up on it, cleans up what it left as
/// after any crash, and serves; stopped, it leaves nothing behind.
#[test]
fn sigkill_of_the_old_agent_mid_takeover_leaves_a_working_agent_and_nothing_behind() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let server = sized_server(&topo)?;
    let dir = tempfile::tempdir()?;
    let builder = Agent::builder(&topo.bastion)?;
    let config = op::config(&builder, &agent_lines(dir.path()));
    let pin_dir = builder.pin_dir().to_owned();
    let mut old = builder
        .config(config)
        .args(["--datapath", "ebpf"])
        .env("TCPGATE_TEST_TAKEOVER_STALL", "offer")
        .spawn()?;
    let config_path = old.config_path().to_owned();
    let mut stranded = open_session(&topo, 1_000, 1_000)?;
    let mut next = std::thread::scope(|scope| -> Result<Agent> {
        let starting =
            scope.spawn(|| successor(&topo.bastion, &config_path, &["--datapath", "ebpf"], &[]));
        let stalled = old.wait_for_log("not answering the successor", Duration::from_secs(30));
        old.signal(Signal::SIGKILL)?;
        old.wait_exit(EXIT_WAIT)?.context("SIGKILL")?;
        stalled?;
        starting
            .join()
            .map_err(|_| anyhow::anyhow!("successor thread panicked"))?
    })?;
    ensure!(
        next.logs().contains("takeover failed; starting afresh"),
        "{}",
        next.logs_tail(20)
    );
    ensure!(op::ended(&mut stranded), "the killed agent's session ends");
    let fresh = open_session(&topo, 2_000, 3_000).with_context(|| next.logs_tail(30))?;
    op::close(fresh);
    stops_cleanly(&mut next)?;
    let left = agent_leftovers(&topo.bastion, &pin_dir)?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    server.stop()?;
    Ok(())
}

/// A local user other than root (or the agent's own) cannot take over:
/// the socket's mode refuses the connection, and with the mode opened up
/// the agent itself checks the peer's uid and sends no descriptor.
#[test]
fn a_local_unprivileged_user_cannot_take_over() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !require_root() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // Like /run/tcpgate under systemd: anyone may traverse the directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let fx = forward_fixture(DataPath::Userspace, dir.path())?;
    let socket = dir.path().join("takeover.sock");
    let as_nobody = |args: &[&str], stdin: std::process::Stdio| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "socat",
            ])
            .args(args)
            .stdin(stdin)
            .output()
    };
    let target = format!("UNIX-CONNECT:{}", socket.display());
    let refused = as_nobody(&["-u", &target, "-"], std::process::Stdio::null())?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && stderr.contains("Permission denied"),
        "{refused:?}"
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let hello = br#"{"type":"hello","state_version":1,"pid":1}"#;
    let frame = dir.path().join("hello.bin");
    let mut bytes = u32::try_from(hello.len())?.to_be_bytes().to_vec();
    bytes.extend_from_slice(hello);
    std::fs::write(&frame, bytes)?;
    let answered = as_nobody(
        &["-t", "5", "-", &target],
        std::fs::File::open(&frame)?.into(),
    )?;
    ensure!(
        answered.stdout.is_empty(),
        "nobody got an answer: {answered:?}"
    );
    fx.agent.wait_for_log(
        "refused a takeover request from a user",
        Duration::from_secs(30),
    )?;
    // Still the one serving.
    echo_once(&fx, b"still")?;
    ensure!(
        !fx.agent.logs().contains("taken over"),
        "{}",
        fx.agent.logs_tail(20)
    );
    Ok(())
}
