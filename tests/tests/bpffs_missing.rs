//! Under `ip netns exec`, which remounts /sys without bpffs, an agent that
//! needs eBPF says that bpffs is not mounted at its pin directory and how
//! to fix it (issue 12.6), instead of a bare "No such file or directory".

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::{ChildGuard, Netns, PinDir, require_root};

#[test]
fn ebpf_under_ip_netns_exec_explains_the_missing_bpffs() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new("bpffs")?;
    let dir = tempfile::tempdir()?;
    let pins = PinDir::new();
    let config = dir.path().join("tcpgate.toml");
    std::fs::write(
        &config,
        format!(
            "auth = \"none\"\n[agent]\npin_dir = {:?}\n[audit]\npath = \"-\"\n\
             [[forward]]\nlisten = \"127.0.0.1:15432\"\nupstream = \"192.0.2.10:5432\"\n",
            pins.path().display().to_string()
        ),
    )?;
    let stderr = dir.path().join("agent.stderr");
    // `Netns::command` is `ip netns exec`: the mounts an operator gets there.
    let mut command = ns.command(tcpgate_tests::agent::agent_binary()?);
    command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--datapath", "ebpf"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr)?);
    let mut agent = ChildGuard::new(command.spawn()?, "agent under ip netns exec");
    let status = agent
        .wait_timeout(Duration::from_secs(60))?
        .context("the agent kept running without bpffs")?;
    let text = std::fs::read_to_string(&stderr)?;
    ensure!(status.code() == Some(1), "exit {status}: {text}");
    for needed in [
        "is not on a bpf filesystem",
        "bpffs is not mounted",
        "mount -t bpf bpf /sys/fs/bpf",
        "nsenter --net=",
    ] {
        ensure!(text.contains(needed), "{needed:?} missing from: {text}");
    }
    ensure!(!pins.path().exists(), "nothing pinned on the host");
    Ok(())
}
