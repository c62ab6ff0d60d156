//! The interception over an agent's life: a SIGHUP reload changes the
//! intercepted set while live sessions go on, a clean exit removes what
//! the agent installed, a SIGKILLed agent's leftovers are replaced by the
//! next start, and a second agent in the namespace is refused.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use tcpgate_tests::intercept::{DB, HTTP, body, start};
use tcpgate_tests::topology::{RUNNER_V4, TARGET_PRIVATE_V4, TARGET_V4};
use tcpgate_tests::{Agent, Signal, Topology, accept_loop, require_root};
use tcpgate_tests::{HttpServer, curl, intercept_config, wait_events};

fn echo_once(stream: &mut TcpStream, message: &[u8]) -> Result<()> {
    stream.write_all(message)?;
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back)?;
    ensure!(back == message, "echo mismatch");
    Ok(())
}

/// SIGHUP swaps 192.0.2.0/24 for 203.0.113.0/24 on port 5432 while a
/// session to 192.0.2.10 is live: it survives; new connections follow the
/// new set.
#[test]
fn sighup_reload_changes_the_set_and_keeps_live_sessions() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let builder = Agent::builder(&topo.bastion)?;
    let config = intercept_config(&builder, &[("192.0.2.0/24", &["5432"])], "");
    let reloaded = intercept_config(&builder, &[("203.0.113.0/24", &["5432"])], "");
    let config_path = builder.config_path();
    let mut agent = builder.config(config).spawn()?;
    let echo = |addr: SocketAddr| {
        accept_loop(
            &topo.target,
            addr,
            4,
            |mut stream, peer| -> Result<SocketAddr> {
                let mut buf = [0u8; 4096];
                loop {
                    let n = stream.read(&mut buf)?;
                    if n == 0 {
                        return Ok(peer);
                    }
                    stream.write_all(&buf[..n])?;
                }
            },
        )
    };
    let old = echo(SocketAddr::from((TARGET_V4, DB)))?;
    let new = echo(SocketAddr::from((TARGET_PRIVATE_V4, DB)))?;
    let dial = |ip: std::net::Ipv4Addr| {
        let addr = SocketAddr::from((ip, DB));
        topo.runner.run(move || TcpStream::connect(addr))
    };
    let mut live = dial(TARGET_V4)?;
    echo_once(&mut live, b"before reload")?;
    wait_events(&agent, "session_open", 1)?;

    std::fs::write(&config_path, reloaded)?;
    agent.signal(Signal::SIGHUP)?;
    agent.wait_for_log("reloaded the intercepted set", Duration::from_secs(20))?;
    echo_once(&mut live, b"after reload, same session")?;

    let mut direct = dial(TARGET_V4)?;
    echo_once(&mut direct, b"no longer intercepted")?;
    let mut intercepted = dial(TARGET_PRIVATE_V4)?;
    echo_once(&mut intercepted, b"newly intercepted")?;
    echo_once(&mut live, b"still alive")?;
    drop((live, direct, intercepted));

    let closed = wait_events(&agent, "session_close", 2)?;
    let destinations: Vec<&str> = closed
        .iter()
        .filter_map(|e| e["destination"].as_str())
        .collect();
    ensure!(
        destinations.contains(&format!("{TARGET_V4}:{DB}").as_str()),
        "{destinations:?}"
    );
    ensure!(
        destinations.contains(&format!("{TARGET_PRIVATE_V4}:{DB}").as_str()),
        "{destinations:?}"
    );
    ensure!(
        closed.iter().all(|e| e["reason"] == "client_closed"),
        "{closed:?}"
    );
    let opened = wait_events(&agent, "session_open", 2)?;
    ensure!(
        opened.len() == 2,
        "the direct connection must not reach the agent: {opened:?}"
    );
    let old_peers = old.stop()?.into_iter().collect::<Result<Vec<_>>>()?;
    ensure!(
        old_peers.iter().any(|p| p.ip() == IpAddr::V4(RUNNER_V4)),
        "direct connection came from the runner: {old_peers:?}"
    );
    new.stop()?;
    Ok(())
}

/// Exit removes everything but the guard table; a SIGKILLed agent leaves
/// routing, marks and pins behind (the sk_lookup link stays attached through
/// its pin), which the next start reports and replaces.
#[test]
fn clean_exit_and_recovery_after_sigkill() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let server = HttpServer::start(&topo.target, IpAddr::V4(TARGET_V4), HTTP, body())?;
    let builder = Agent::builder(&topo.bastion)?;
    let config = intercept_config(&builder, &[("192.0.2.0/24", &["80"])], "");
    let pin_dir = builder.pin_dir().to_owned();
    let mut agent = builder.config(config.clone()).spawn()?;
    ensure!(
        curl(&topo.runner, &format!("http://{TARGET_V4}/file.bin"))? == server.body,
        "body"
    );
    ensure!(
        !tcpgate_tests::routing_leftovers(&topo.bastion)?.is_empty(),
        "routing installed"
    );
    ensure!(
        tcpgate_tests::sk_lookup_links(&topo.bastion)? == 1,
        "one sk_lookup link"
    );
    let status = agent.stop()?;
    ensure!(
        status.success(),
        "clean exit: {status:?}\n{}",
        agent.logs_tail(10)
    );
    ensure!(
        tcpgate_tests::routing_leftovers(&topo.bastion)?.is_empty(),
        "{:?}",
        tcpgate_tests::routing_leftovers(&topo.bastion)?
    );
    ensure!(!pin_dir.exists(), "pins removed");
    ensure!(
        tcpgate_tests::sk_lookup_links(&topo.bastion)? == 0,
        "link detached"
    );
    ensure!(
        tcpgate_tests::firewall::tables(&topo.bastion)? == ["tcpgate_guard"],
        "only the guard table stays: {:?}",
        tcpgate_tests::firewall::tables(&topo.bastion)?
    );

    let builder = Agent::builder(&topo.bastion)?;
    let config = intercept_config(&builder, &[("192.0.2.0/24", &["80"])], "");
    let pin_dir = builder.pin_dir().to_owned();
    let config_path = builder.config_path();
    let mut killed = builder.config(config).spawn()?;
    killed.signal(Signal::SIGKILL)?;
    killed.wait_exit(Duration::from_secs(10))?;
    ensure!(
        !tcpgate_tests::routing_leftovers(&topo.bastion)?.is_empty(),
        "SIGKILL leaves routing behind"
    );
    ensure!(
        pin_dir.join("sessions").exists(),
        "SIGKILL leaves pins behind"
    );
    ensure!(
        tcpgate_tests::sk_lookup_links(&topo.bastion)? == 1,
        "the pinned link outlives the process"
    );
    ensure!(
        tcpgate_tests::firewall::tables(&topo.bastion)? == ["tcpgate_guard", "tcpgate_intercept"],
        "{:?}",
        tcpgate_tests::firewall::tables(&topo.bastion)?
    );

    // The same config (same pin dir) again, in a fresh agent process.
    let text = std::fs::read_to_string(&config_path)?;
    let restarted_builder = Agent::builder(&topo.bastion)?;
    let restarted = restarted_builder.config(text).spawn()?;
    let logs = restarted.logs();
    ensure!(
        logs.contains("left by a previous agent"),
        "restart reports the leftovers:\n{logs}"
    );
    ensure!(
        curl(&topo.runner, &format!("http://{TARGET_V4}/file.bin"))? == server.body,
        "works after restart"
    );
    ensure!(
        tcpgate_tests::sk_lookup_links(&topo.bastion)? == 1,
        "the restart replaced the pinned link"
    );
    drop(restarted);
    ensure!(
        tcpgate_tests::sk_lookup_links(&topo.bastion)? == 0,
        "link detached"
    );
    ensure!(
        tcpgate_tests::routing_leftovers(&topo.bastion)?.is_empty(),
        "{:?}",
        tcpgate_tests::routing_leftovers(&topo.bastion)?
    );
    ensure!(!pin_dir.exists(), "stale pins removed");
    drop(killed);
    Ok(())
}

#[test]
fn second_agent_in_the_namespace_fails_clearly() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let first = start(&topo)?;
    let builder = Agent::builder(&topo.bastion)?;
    let config = intercept_config(&builder, &[("192.0.2.0/24", &["80"])], "");
    match builder.config(config).spawn() {
        Ok(_) => anyhow::bail!("a second agent started"),
        Err(e) => {
            let text = format!("{e:?}");
            ensure!(
                text.contains("already running in this network namespace"),
                "{text}"
            );
            ensure!(
                text.contains(&format!("pid {}", first.pid())),
                "names the running agent: {text}"
            );
        }
    }
    Ok(())
}
