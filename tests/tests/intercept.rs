//! Transparent interception: runners (and the bastion itself) dial the real
//! target address, and the bastion's agent takes the connection; everything
//! else to a protected prefix is dropped (see fail_closed.rs). Reloads, exit
//! and restart are in intercept_lifecycle.rs.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use tcpgate_tests::intercept::{DB, HTTP, body, start};
use tcpgate_tests::topology::{
    BASTION_RUNNER_V4, BASTION_TARGET_V4, RUNNER_V4, RUNNER_V6, TARGET_V4, TARGET_V6,
};
use tcpgate_tests::{Agent, Topology, accept_loop, require_root};
use tcpgate_tests::{HttpServer, curl, dial_from, intercept_config, wait_events};

const OTHER: u16 = 8080;

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
