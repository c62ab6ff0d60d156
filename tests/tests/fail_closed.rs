//! Fail closed at the packet level: the guard table drops every protected
//! prefix (all ports and protocols) whether the agent runs, stopped or
//! crashed, and moves with the set on reload; interception catches any
//! interface, whenever it appears.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{Result, ensure};
use tcpgate_tests::firewall::{UdpSink, ping, tables, tcp_reaches};
use tcpgate_tests::topology::{BASTION_RUNNER_IF, TARGET_PRIVATE_V4, TARGET_V4, TARGET_V6};
use tcpgate_tests::{Agent, Netns, Payload, Signal, Topology, accept_loop, require_root};
use tcpgate_tests::{HttpServer, curl, intercept_config, wait_events};

const HTTP: u16 = 80;
/// A TCP port on the protected prefix that is not intercepted.
const OTHER: u16 = 8080;
const UDP: u16 = 5353;

fn body() -> Vec<u8> {
    Payload::new(11, 1 << 20).to_vec()
}

fn spawn(topo: &Topology) -> Result<Agent> {
    let builder = Agent::builder(&topo.bastion)?;
    let config = intercept_config(
        &builder,
        &[("192.0.2.0/24", &["80"]), ("2001:db8:2::/64", &["80"])],
        "",
    );
    Ok(builder.config(config).spawn()?)
}

/// A TCP service on the target's unintercepted port, for up to `n`
/// connections.
fn target_service(
    target: &Netns,
    ip: IpAddr,
    port: u16,
    n: usize,
) -> Result<tcpgate_tests::AcceptLoop<()>> {
    Ok(accept_loop(
        target,
        SocketAddr::new(ip, port),
        n,
        |mut stream, _| {
            let _ = stream.write_all(b"direct");
        },
    )?)
}

/// Neither the runner nor a process on the bastion gets TCP, UDP or ICMP
/// to the target's unintercepted services through.
fn assert_closed(topo: &Topology, udp: &UdpSink, state: &str) -> Result<()> {
    for from in [&topo.runner, &topo.bastion] {
        let who = from.name();
        for ip in [IpAddr::V4(TARGET_V4), IpAddr::V6(TARGET_V6)] {
            ensure!(
                !tcp_reaches(from, SocketAddr::new(ip, OTHER))?,
                "{state}: TCP {ip} port {OTHER} reached from {who}"
            );
        }
        ensure!(
            !udp.reached_from(from, &format!("{state} from {who}"))?,
            "{state}: UDP reached from {who}"
        );
    }
    ensure!(
        !ping(&topo.runner, TARGET_V4)?,
        "{state}: ICMP reached from the runner"
    );
    Ok(())
}

/// A listener on the bastion's wildcard address that may accept for any
/// destination (IP_TRANSPARENT, as a second transparent proxy would): the
/// kind of service that could answer for the target once sk_lookup is gone.
/// Non-blocking: completed handshakes wait in its queue for `accept`.
fn wildcard_listener(bastion: &Netns) -> Result<TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, HTTP));
    let listener = tcpgate_tests::servers::bind(bastion, addr)?;
    nix::sys::socket::setsockopt(
        &listener.as_fd(),
        nix::sys::socket::sockopt::IpTransparent,
        &true,
    )?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[test]
fn protected_prefix_stays_dropped_in_every_agent_state() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let server = HttpServer::start(&topo.target, IpAddr::V4(TARGET_V4), HTTP, body())?;
    let direct = target_service(&topo.target, IpAddr::V4(TARGET_V4), OTHER, 8)?;
    let direct_v6 = target_service(&topo.target, IpAddr::V6(TARGET_V6), OTHER, 8)?;
    let udp = UdpSink::bind(&topo.target, SocketAddr::from((TARGET_V4, UDP)))?;
    let url = format!("http://{TARGET_V4}/file.bin");

    // Running: admitted sessions work, byte-exact, while the drop is in place.
    let mut agent = spawn(&topo)?;
    ensure!(tables(&topo.bastion)? == ["tcpgate_guard", "tcpgate_intercept"]);
    assert_closed(&topo, &udp, "running")?;
    for from in [&topo.runner, &topo.bastion] {
        ensure!(curl(from, &url)? == server.body, "intercepted body");
    }
    wait_events(&agent, "session_close", 2)?;

    // Stopped (SIGTERM): nothing is intercepted, and nothing gets through.
    ensure!(agent.stop()?.success(), "{}", agent.logs_tail(10));
    ensure!(
        tables(&topo.bastion)? == ["tcpgate_guard"],
        "the guard stays"
    );
    assert_closed(&topo, &udp, "stopped")?;
    for from in [&topo.runner, &topo.bastion] {
        ensure!(
            !tcp_reaches(from, SocketAddr::from((TARGET_V4, HTTP)))?,
            "stopped: the intercepted port reached the target from {}",
            from.name()
        );
    }

    // Crashed (SIGKILL): the marks and routes stay, the pinned sk_lookup
    // program refuses intercepted SYNs, and a wildcard listener on the
    // bastion never answers for the target's address.
    let mut killed = spawn(&topo)?;
    ensure!(curl(&topo.runner, &url)? == server.body, "after restart");
    let wildcard = wildcard_listener(&topo.bastion)?;
    killed.signal(Signal::SIGKILL)?;
    killed.wait_exit(Duration::from_secs(10))?;
    assert_closed(&topo, &udp, "crashed")?;
    for from in [&topo.runner, &topo.bastion] {
        ensure!(
            !tcp_reaches(from, SocketAddr::from((TARGET_V4, HTTP)))?,
            "crashed: the intercepted port was answered for {}",
            from.name()
        );
    }
    ensure!(
        matches!(wildcard.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the bastion's wildcard listener answered for the target"
    );
    ensure!(direct.stop()?.is_empty(), "the target accepted on {OTHER}");
    ensure!(
        direct_v6.stop()?.is_empty(),
        "the target accepted on {OTHER} (IPv6)"
    );

    // Only an explicit removal opens the prefix again.
    let tcpgate = |args: &[&str]| {
        topo.bastion
            .command(killed.binary())
            .args(["firewall"])
            .args(args)
            .output()
    };
    let shown = tcpgate(&["show"])?;
    let listing = String::from_utf8_lossy(&shown.stdout);
    ensure!(
        shown.status.success() && listing.contains("drop"),
        "{listing}"
    );
    ensure!(
        !listing.contains("counter packets 0 "),
        "the drops were counted: {listing}"
    );
    let removed = tcpgate(&["remove"])?;
    ensure!(
        removed.status.success() && String::from_utf8_lossy(&removed.stdout).contains("removed"),
        "{removed:?}"
    );
    ensure!(!tables(&topo.bastion)?.contains(&"tcpgate_guard".to_owned()));
    let open = target_service(&topo.target, IpAddr::V4(TARGET_V4), OTHER + 1, 1)?;
    ensure!(
        tcp_reaches(&topo.runner, SocketAddr::from((TARGET_V4, OTHER + 1)))?,
        "without the guard the runner reaches the target"
    );
    ensure!(
        udp.reached_from(&topo.runner, "unguarded")?,
        "UDP without the guard"
    );
    open.stop()?;
    let again = tcpgate(&["remove"])?;
    ensure!(
        again.status.success(),
        "removing twice is harmless: {again:?}"
    );
    ensure!(
        tcpgate(&["show"])?.status.code() == Some(1),
        "show without a table"
    );
    Ok(())
}

/// An interface that appears after the agent started (a second runner
/// network) is intercepted, and its traffic to other ports is dropped.
#[test]
fn interface_added_after_start_is_intercepted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let agent = spawn(&topo)?;
    let server = HttpServer::start(&topo.target, IpAddr::V4(TARGET_V4), HTTP, body())?;
    let second = Netns::new("r2")?;
    let new_if = format!("{BASTION_RUNNER_IF}2");
    topo.bastion.ip([
        "link",
        "add",
        &new_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        second.name(),
    ])?;
    topo.bastion
        .ip(["addr", "add", "198.51.100.129/25", "dev", &new_if])?;
    second.ip(["addr", "add", "198.51.100.130/25", "dev", "eth0"])?;
    topo.bastion.ip(["link", "set", &new_if, "up"])?;
    second.ip(["link", "set", "eth0", "up"])?;
    second.ip(["route", "add", "default", "via", "198.51.100.129"])?;

    ensure!(
        curl(&second, &format!("http://{TARGET_V4}/file.bin"))? == server.body,
        "body through the new interface"
    );
    let event = &wait_events(&agent, "session_close", 1)?[0];
    ensure!(
        event["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("198.51.100.130:")),
        "the agent served the new network's runner: {event}"
    );
    let direct = target_service(&topo.target, IpAddr::V4(TARGET_V4), OTHER, 1)?;
    ensure!(
        !tcp_reaches(&second, SocketAddr::from((TARGET_V4, OTHER)))?,
        "the new interface reached an unintercepted port"
    );
    ensure!(direct.stop()?.is_empty());
    Ok(())
}

/// SIGHUP moves the guard with the set: a prefix that joins is dropped at
/// once (but for its intercepted ports), one that leaves is routed again.
#[test]
fn reload_moves_the_guard_with_the_intercepted_set() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let builder = Agent::builder(&topo.bastion)?;
    let before = intercept_config(&builder, &[("192.0.2.0/24", &["80"])], "");
    let after = intercept_config(&builder, &[("203.0.113.0/24", &["80"])], "");
    let config_path = builder.config_path();
    let mut agent = builder.config(before).spawn()?;
    let joins = SocketAddr::from((TARGET_PRIVATE_V4, OTHER));
    let leaves = SocketAddr::from((TARGET_V4, OTHER));
    let services = [
        target_service(&topo.target, joins.ip(), OTHER, 1)?,
        target_service(&topo.target, leaves.ip(), OTHER, 1)?,
    ];
    ensure!(!tcp_reaches(&topo.runner, leaves)?, "protected before");

    std::fs::write(&config_path, after)?;
    agent.signal(Signal::SIGHUP)?;
    agent
        .notify()
        .wait_for("STATUS=serving", Duration::from_secs(20))?;
    ensure!(
        !tcp_reaches(&topo.runner, joins)?,
        "the joining prefix is dropped"
    );
    ensure!(
        tcp_reaches(&topo.runner, leaves)?,
        "the leaving prefix is routed again"
    );
    let [joined, left] = services;
    ensure!(joined.stop()?.is_empty(), "the joining prefix was reached");
    ensure!(left.stop()?.len() == 1);
    Ok(())
}
