//! What a local unprivileged user (uid 65534) can do to the agent's locks
//! and pins: take neither lock first, hold neither, and not have the
//! agent pin its maps in a directory that user controls.

use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::intercept::start;
use tcpgate_tests::{Agent, ChildGuard, Topology, eventually, intercept_config, require_root};

const NOBODY: &str = "65534";

fn as_nobody(command: &mut std::process::Command) -> &mut std::process::Command {
    command.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
}

/// Checks that uid 65534 cannot even open `path` to `flock` it (flock(1)
/// opens the file, creating it if it may): a lock that is merely busy
/// would also refuse, so the reason is checked, not just the failure.
fn nobody_cannot_open(path: &std::path::Path) -> Result<()> {
    let output = as_nobody(&mut std::process::Command::new("setpriv"))
        .args(["flock", "--nonblock", "--exclusive"])
        .arg(path)
        .arg("true")
        .output()
        .context("run setpriv flock")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("Permission denied"),
        "uid 65534 on {}: {output:?}",
        path.display()
    );
    Ok(())
}

/// Checks that an agent's start failed because `pid` holds the namespace.
fn refused_for(started: Result<Agent, impl std::fmt::Debug>, pid: u32) -> Result<()> {
    match started {
        Ok(_) => anyhow::bail!("an agent started while pid {pid} holds the namespace"),
        Err(e) => ensure!(
            format!("{e:?}").contains(&format!(
                "already running in this network namespace (pid {pid})"
            )),
            "{e:?}"
        ),
    }
    Ok(())
}

/// The agent's namespace lock file: named by the namespace's inode.
fn namespace_lock(topo: &Topology) -> Result<std::path::PathBuf> {
    let ino = std::fs::metadata(topo.bastion.path())?.ino();
    Ok(std::path::PathBuf::from(format!(
        "/run/tcpgate/netns-{ino}.lock"
    )))
}

/// The abstract socket name that was the namespace lock, bound by another
/// user before the agent starts, and its lock file, which that user can
/// neither create nor open: the agent starts, holds the lock (a second
/// agent is refused), and the user still cannot lock its file.
#[test]
fn a_local_user_cannot_take_the_namespace_lock() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let squatter = as_nobody(&mut topo.bastion.command("setpriv"))
        .args([
            "socat",
            "ABSTRACT-LISTEN:tcpgate-agent,fork",
            "OPEN:/dev/null",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn socat")?;
    let _squatter = ChildGuard::new(squatter, "abstract-name squatter");
    eventually(Duration::from_secs(10), "the squatter's name", || {
        topo.bastion
            .exec_ok(&["cat", "/proc/net/unix"])
            .map(|table| table.contains("@tcpgate-agent"))
    })?;
    let lock = namespace_lock(&topo)?;
    // The runtime directory as an agent makes it, so the attempt fails on
    // permissions, not on a missing directory.
    std::fs::create_dir_all(lock.parent().context("runtime dir")?)?;
    nobody_cannot_open(&lock)?;

    let agent = start(&topo)?;
    let meta = std::fs::metadata(&lock).context("the agent's lock file")?;
    ensure!(
        meta.uid() == 0 && meta.mode() & 0o077 == 0,
        "root's, mode 0600: {:o}",
        meta.mode()
    );
    nobody_cannot_open(&lock)?;
    let second = Agent::builder(&topo.bastion)?;
    let config = intercept_config(&second, &[("192.0.2.0/24", &["80"])], "");
    refused_for(second.config(config).spawn(), agent.pid())?;
    drop(agent);
    ensure!(!lock.exists(), "the lock file is removed on exit");
    Ok(())
}

/// A pin directory another user made (bpffs at /sys/fs/bpf may let anyone
/// create one): the agent refuses it, naming its owner, before it pins
/// anything, rather than keep its maps where that user can replace them.
#[test]
fn a_pin_directory_another_user_owns_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let builder = Agent::builder(&topo.bastion)?;
    let pins = builder.pin_dir().to_owned();
    std::fs::create_dir_all(&pins)?;
    std::os::unix::fs::chown(&pins, Some(65534), Some(65534))?;
    let config = intercept_config(&builder, &[("192.0.2.0/24", &["80"])], "");
    match builder.config(config).spawn() {
        Ok(_) => anyhow::bail!("the agent started with pins in nobody's directory"),
        // Refused while taking the pin directory's lock: before any map
        // is created or pinned.
        Err(e) => ensure!(
            format!("{e:?}").contains(&format!("{} is owned by uid 65534", pins.display())),
            "{e:?}"
        ),
    }
    Ok(())
}

/// An agent of an older build held the namespace by binding the abstract
/// name (as root): a newer agent started beside it is refused, naming its
/// pid, and a newer agent that runs holds the name for older ones.
#[test]
fn an_older_agent_on_the_abstract_name_still_holds_the_namespace() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let older = topo
        .bastion
        .command("socat")
        .args(["ABSTRACT-LISTEN:tcpgate-agent,fork", "OPEN:/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn socat")?;
    let older = ChildGuard::new(older, "older agent's lock");
    let bound = || {
        topo.bastion
            .exec_ok(&["cat", "/proc/net/unix"])
            .map(|table| table.contains("@tcpgate-agent"))
    };
    eventually(Duration::from_secs(10), "the older agent's name", bound)?;
    refused_for(start(&topo), older.pid())?;
    drop(older);
    eventually(Duration::from_secs(10), "the name freed", || {
        bound().map(|held| !held)
    })?;
    let _agent = start(&topo)?;
    ensure!(
        bound()?,
        "the running agent holds the name for older builds"
    );
    Ok(())
}
