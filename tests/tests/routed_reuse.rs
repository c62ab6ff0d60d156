//! A runner reusing a finished routed flow's 4-tuple (its source port)
//! while the finished flow still lingers in `FLOWS` for its close line:
//! the new SYN starts a new flow in the entry, which the agent closes
//! apart and never removes under the new connection. Both connections
//! are byte-exact, each with its own audit lines and counts. A runner
//! churning a few source ports while the agent removes their finished
//! flows loses no connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::{AuthFixture, policy};
use tcpgate_tests::preamble::{encode, read_answer};
use tcpgate_tests::routed::{
    DialOptions, echo_three, fast_open_v4, redial_from_runner_port, routed_fixture,
    routed_launch_lingering, three_byte_echo, three_byte_echoes, wait_whole_poll,
};
use tcpgate_tests::topology::RUNNER_V4;
use tcpgate_tests::{eventually, require_root, wait_events};

const PORT: u16 = 9000;
const SOURCE_PORT: u16 = 40_123;

#[test]
fn a_reused_source_port_starts_a_new_routed_flow() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    // Echoes three bytes and closes first, so the runner keeps no
    // TIME_WAIT and can reuse its port at once.
    let _server = three_byte_echo(&fx, PORT)?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let target = AuthFixture::target(PORT);
    for (round, message) in [(1, b"one"), (2, b"two")] {
        let mut stream = redial_from_runner_port(&fx, SOURCE_PORT, target)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        // The agent's poll sees each flow open: a flow opened and replaced
        // within one poll is never seen (docs/routed.md).
        wait_events(&fx.agent, "session_open", round)?;
        if round == 2 {
            // Past the first flow's linger, when its entry would be removed
            // if the agent took the new flow for the old one.
            std::thread::sleep(Duration::from_millis(1000));
        }
        echo_three(&mut stream, message).with_context(|| format!("round {round}"))?;
        drop(stream);
        // A poll reads the finished flow's final counters before the reuse
        // replaces its entry (docs/routed.md).
        wait_whole_poll(&fx)?;
    }
    let opened = wait_events(&fx.agent, "session_open", 2)?;
    let closed = wait_events(&fx.agent, "session_close", 2)?;
    ensure!(
        opened.iter().all(|e| e["datapath"] == "routed")
            && opened[0]["session_id"] != opened[1]["session_id"],
        "two routed sessions: {opened:?}"
    );
    for event in &closed {
        ensure!(
            event["kernel_bytes_up"] == 3 && event["kernel_bytes_down"] == 3,
            "each counted on its own: {event}"
        );
    }
    Ok(())
}

/// A fast-open SYN carrying a token preamble on the 4-tuple of a finished
/// routed flow that still lingers in `FLOWS` is decided like any SYN: not
/// routed (the program cannot screen bytes in a SYN), so the intercepting
/// path reads the preamble, and the echoing target never sees a byte of it.
#[test]
fn a_fast_open_syn_on_a_lingering_routed_tuple_takes_the_intercepting_path() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let _server = three_byte_echo(&fx, PORT)?;
    let token = fx.token();
    fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])?;
    fx.topo.runner.sysctl("net.ipv4.tcp_fastopen", "5")?;
    let target = AuthFixture::target(PORT);
    let mut routed = redial_from_runner_port(&fx, SOURCE_PORT, target)?;
    routed.set_read_timeout(Some(Duration::from_secs(10)))?;
    // The agent's poll sees the routed flow open.
    let opened = &wait_events(&fx.agent, "session_open", 1)?[0];
    ensure!(
        opened["datapath"] == "routed",
        "first flow routed: {opened}"
    );
    routed.write_all(b"one")?;
    let mut back = [0u8; 3];
    routed.read_exact(&mut back)?;
    ensure!(&back == b"one", "routed echo");
    let mut rest = Vec::new();
    routed.read_to_end(&mut rest)?;
    drop(routed);
    // The poll that sees the flow end writes its close line; the entry
    // lingers on (300 ms). Reuse within the same poll loses the line (the
    // audit gap docs/routed.md names), so wait for it, then at once.
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(closed["kernel_bytes_up"] == 3, "routed close: {closed}");
    let preamble = encode(&token);
    let local = SocketAddrV4::new(RUNNER_V4, SOURCE_PORT);
    let options = DialOptions {
        mark: None,
        local: Some(local),
    };
    let (mut stream, syn_data) = fx
        .topo
        .runner
        .run(move || fast_open_v4(target, &preamble, options))?;
    ensure!(syn_data > 0, "the SYN carried the preamble's first bytes");
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (status, message) = read_answer(&mut stream)?;
    ensure!(status == 0, "the agent admits the preamble: {message}");
    stream.write_all(b"two")?;
    stream.read_exact(&mut back)?;
    ensure!(&back == b"two", "the echo holds no preamble byte: {back:?}");
    drop(stream);
    let opened = wait_events(&fx.agent, "session_open", 2)?;
    ensure!(
        opened[1]["datapath"] != "routed",
        "the fast-open SYN is intercepted: {:?}",
        opened[1]
    );
    let closed = wait_events(&fx.agent, "session_close", 2)?;
    let intercepted = closed
        .iter()
        .find(|e| e["datapath"] != "routed")
        .ok_or_else(|| anyhow::anyhow!("no intercepted close: {closed:?}"))?;
    ensure!(
        intercepted["bytes_up"] == 3,
        "only the payload reached the target: {intercepted}"
    );
    Ok(())
}

/// Runner threads, and connections each makes.
const CHURNERS: usize = 4;
const CYCLES: usize = 1000;
/// Routed flows held open meanwhile: the agent walks them every poll,
/// between its last look at the ring and its removal of finished flows.
const HELD: usize = 1000;
/// The churners' source ports: below the default range the held flows
/// take theirs from.
const CHURN_PORTS: std::ops::RangeInclusive<u16> = 20_000..=20_015;

/// A runner cycling through 16 source ports as fast as it can while the
/// agent removes finished flows at once (`linger` 1 ms, a poll every
/// 10 ms) and holds a thousand other flows: SYNs keep reusing ports whose
/// finished flows are being removed. Each new flow keeps its entry;
/// removing by key took some (the intercepting path then reset the
/// connection after its handshake). Every connection is routed, echoed
/// exactly, and has its own lines; the held flows still echo after it.
#[test]
fn a_runner_churning_few_ports_through_removals_loses_no_connection() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let launch = routed_launch_lingering("1ms", "poll_interval = \"10ms\"");
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    let total = CHURNERS * CYCLES + HELD;
    let _server = three_byte_echoes(&fx, PORT, total)?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let target = AuthFixture::target(PORT);
    let mut held = fx.topo.runner.run(|| {
        (0..HELD)
            .map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(5)))
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    fx.topo.runner.sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("{} {}", CHURN_PORTS.start(), CHURN_PORTS.end()),
    )?;
    let failures: Vec<String> = std::thread::scope(|scope| {
        let churners: Vec<_> = (0..CHURNERS)
            .map(|_| scope.spawn(|| fx.topo.runner.run(|| churn(target))))
            .collect();
        churners
            .into_iter()
            .flat_map(|c| {
                c.join()
                    .unwrap_or_else(|_| vec!["a churner panicked".into()])
            })
            .collect()
    });
    ensure!(
        failures.is_empty(),
        "{} of {} connections failed; first: {}",
        failures.len(),
        CHURNERS * CYCLES,
        failures[0]
    );
    for (i, stream) in held.iter_mut().enumerate() {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        echo_three(stream, b"xyz").with_context(|| format!("held flow {i}"))?;
    }
    drop(held);
    // The churners' flows, each with its own lines. (A held flow may have
    // two: with `linger` 1 ms a SYN the target's full backlog left
    // unanswered that long is removed, and its retransmission starts a
    // new flow.)
    let churned = CHURNERS * CYCLES;
    let counts = std::cell::Cell::new((0, 0));
    eventually(
        Duration::from_secs(30),
        &format!("{churned} routed sessions opened and closed"),
        || -> Result<_> {
            let events = fx.agent.audit_events()?;
            let count = |kind: &str| {
                events
                    .iter()
                    .filter(|e| e["event"] == kind && e["datapath"] == "routed")
                    .filter(|e| e["source"].as_str().is_some_and(from_churn_port))
                    .count()
            };
            counts.set((count("session_open"), count("session_close")));
            Ok((counts.get() == (churned, churned)).then_some(()))
        },
    )
    .with_context(|| format!("(opened, closed): {:?}", counts.get()))
}

/// Whether an audit line's `source` is one of the churners' ports.
fn from_churn_port(source: &str) -> bool {
    source
        .parse::<SocketAddrV4>()
        .is_ok_and(|a| CHURN_PORTS.contains(&a.port()))
}

/// `CYCLES` connections one after another; what went wrong with each that
/// failed.
fn churn(target: SocketAddr) -> Vec<String> {
    (0..CYCLES)
        .filter_map(|round| {
            let result = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .map_err(anyhow::Error::from)
                .and_then(|mut stream| {
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    echo_three(&mut stream, b"abc")
                });
            result.err().map(|e| format!("round {round}: {e:#}"))
        })
        .collect()
}
