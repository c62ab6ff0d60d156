//! Transparent interception: runners (and the bastion itself) dial the real
//! target address, and the bastion's agent takes the connection; everything
//! else to a protected prefix is dropped (see fail_closed.rs).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use tcpgate_tests::topology::{
    BASTION_RUNNER_V4, BASTION_TARGET_V4, RUNNER_V4, RUNNER_V6, TARGET_PRIVATE_V4, TARGET_V4,
    TARGET_V6,
};
use tcpgate_tests::{Agent, Payload, Signal, Topology, accept_loop, require_root};
use tcpgate_tests::{HttpServer, curl, dial_from, intercept_config, wait_events};

const HTTP: u16 = 80;
const OTHER: u16 = 8080;
const DB: u16 = 5432;

fn body() -> Vec<u8> {
    Payload::new(42, 256 * 1024).to_vec()
}

/// Intercepts HTTP on the target prefixes (v4 and v6), plus port 5432.
fn start(topo: &Topology) -> Result<Agent> {
    let builder = Agent::builder(&topo.bastion)?;
    let config = intercept_config(
        &builder,
        &[
            ("192.0.2.0/24", &["80", "5432"]),
            ("2001:db8:2::/64", &["80"]),
        ],
        "",
    );
    Ok(builder.config(config).spawn()?)
}

#[test]
fn runner_curl_is_intercepted_v4_and_v6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let agent = start(&topo)?;
    let v4 = HttpServer::start(&topo.target, IpAddr::V4(TARGET_V4), HTTP, body())?;
    let v6 = HttpServer::start(&topo.target, IpAddr::V6(TARGET_V6), HTTP, body())?;
    ensure!(
        curl(&topo.runner, &format!("http://{TARGET_V4}/file.bin"))? == v4.body,
        "v4 body"
    );
    ensure!(
        curl(&topo.runner, &format!("http://[{TARGET_V6}]/file.bin"))? == v6.body,
        "v6 body"
    );
    let closed = wait_events(&agent, "session_close", 2)?;
    let v4_event = closed
        .iter()
        .find(|e| e["destination"] == format!("{TARGET_V4}:{HTTP}"));
    let v6_event = closed
        .iter()
        .find(|e| e["destination"] == format!("[{TARGET_V6}]:{HTTP}"));
    for (event, source) in [
        (v4_event, IpAddr::V4(RUNNER_V4)),
        (v6_event, IpAddr::V6(RUNNER_V6)),
    ] {
        let event = event
            .ok_or_else(|| anyhow::anyhow!("no session for the dialled address: {closed:?}"))?;
        ensure!(
            event["source"]
                .as_str()
                .is_some_and(|s| s.parse::<SocketAddr>().is_ok_and(|a| a.ip() == source)),
            "{event}"
        );
        ensure!(
            event["upstream"] == event["destination"],
            "upstream is the original destination: {event}"
        );
        ensure!(
            event["kernel_bytes_down"].as_u64() > Some(256 * 1024),
            "response went through the kernel: {event}"
        );
        ensure!(event["userspace_bytes_down"] == 0, "{event}");
    }
    Ok(())
}

/// Local processes are intercepted whatever source address they bind, and
/// the agent sees that address.
#[test]
fn bastion_local_process_is_intercepted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let agent = start(&topo)?;
    let server = HttpServer::start(&topo.target, IpAddr::V4(TARGET_V4), HTTP, body())?;
    ensure!(
        curl(&topo.bastion, &format!("http://{TARGET_V4}/file.bin"))? == server.body,
        "body"
    );
    let event = &wait_events(&agent, "session_close", 1)?[0];
    ensure!(
        event["source"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{BASTION_TARGET_V4}:"))),
        "an unbound local client reads as the source its route picks: {event}"
    );
    ensure!(
        event["destination"] == format!("{TARGET_V4}:{HTTP}"),
        "{event}"
    );
    ensure!(
        event["kernel_bytes_down"].as_u64() > Some(256 * 1024),
        "{event}"
    );

    // Bound to the bastion's address on another link.
    let target = accept_loop(
        &topo.target,
        SocketAddr::from((TARGET_V4, DB)),
        1,
        |mut stream, peer| -> Result<SocketAddr> {
            stream.write_all(b"target")?;
            Ok(peer)
        },
    )?;
    let mut stream = dial_from(
        &topo.bastion,
        IpAddr::V4(BASTION_RUNNER_V4),
        SocketAddr::from((TARGET_V4, DB)),
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    ensure!(reply == "target", "got {reply:?}");
    drop(stream);
    let closed = wait_events(&agent, "session_close", 2)?;
    let bound = closed
        .iter()
        .find(|e| e["destination"] == format!("{TARGET_V4}:{DB}"))
        .ok_or_else(|| anyhow::anyhow!("the bound client was not intercepted: {closed:?}"))?;
    ensure!(
        bound["source"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{BASTION_RUNNER_V4}:"))),
        "{bound}"
    );
    target.stop()?;
    Ok(())
}

/// Another port on an intercepted address is dropped, from the runner and
/// from the bastion itself; `pass = ["icmp"]` opens ICMP only. The agent
/// never sees any of it.
#[test]
fn unintercepted_port_is_dropped_unless_passed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let builder = Agent::builder(&topo.bastion)?;
    let config = intercept_config(&builder, &[("192.0.2.0/24", &["80"])], "")
        .replace("[intercept]\n", "[intercept]\npass = [\"icmp\"]\n");
    let agent = builder.config(config).spawn()?;
    let server = accept_loop(
        &topo.target,
        SocketAddr::from((TARGET_V4, OTHER)),
        2,
        |mut stream, peer| -> Result<SocketAddr> {
            stream.write_all(b"direct")?;
            Ok(peer)
        },
    )?;
    for from in [&topo.runner, &topo.bastion] {
        ensure!(
            !tcpgate_tests::firewall::tcp_reaches(from, SocketAddr::from((TARGET_V4, OTHER)))?,
            "reached the unintercepted port from {}",
            from.name()
        );
    }
    ensure!(
        tcpgate_tests::firewall::ping(&topo.runner, TARGET_V4)?,
        "pass = [\"icmp\"] lets ping through"
    );
    ensure!(
        server.stop()?.is_empty(),
        "the target accepted a connection"
    );
    ensure!(
        agent.audit_events()?.is_empty(),
        "the agent saw an unintercepted connection"
    );
    Ok(())
}

/// Intercepted, but nothing listens upstream: the client's connection ends
/// at once, and the agent logs why.
#[test]
fn upstream_down_is_refused_promptly() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let agent = start(&topo)?;
    let addr = SocketAddr::from((TARGET_V4, DB));
    let mut stream = topo.runner.run(move || TcpStream::connect(addr))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = [0u8; 8];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => anyhow::bail!("expected the connection to end, got {other:?}"),
    }
    let event = &wait_events(&agent, "session_close", 1)?[0];
    ensure!(event["reason"] == "upstream_unreachable", "{event}");
    ensure!(
        event["detail"]
            .as_str()
            .is_some_and(|d| d.contains("refused")),
        "{event}"
    );
    agent.wait_for_log("upstream unreachable", Duration::from_secs(10))?;
    Ok(())
}

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

/// A prefix mapped to another upstream: runners dial a virtual service
/// address that exists nowhere, and reach the real server.
#[test]
fn virtual_service_address_maps_to_its_upstream() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let builder = Agent::builder(&topo.bastion)?;
    let mapping = format!("upstream = \"{TARGET_V4}\"\n");
    let mut config = intercept_config(&builder, &[("203.0.113.0/24", &["80"])], "");
    config.push_str(&mapping);
    let agent = builder.config(config).spawn()?;
    let server = HttpServer::start(&topo.target, IpAddr::V4(TARGET_V4), HTTP, body())?;
    ensure!(
        curl(&topo.runner, "http://203.0.113.50/file.bin")? == server.body,
        "virtual address served by the real upstream"
    );
    let event = &wait_events(&agent, "session_close", 1)?[0];
    ensure!(event["destination"] == "203.0.113.50:80", "{event}");
    ensure!(
        event["upstream"] == format!("{TARGET_V4}:{HTTP}"),
        "{event}"
    );
    Ok(())
}
