//! Grants: source-bound grants for unmodified clients, preamble grants via
//! `tcpgate connect`, expiry teardown, revocation, and two runners on one
//! bastion.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, streamer};
use tcpgate_tests::payload::read_until_end;
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::wait_events;
use tcpgate_tests::{ChildGuard, Payload, require_root, write_payload};

#[test]
fn source_grant_admits_plain_clients_without_waiting() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = tcpgate_tests::auth_fixture::echo_service(&fx, b"HELLO\n")?;
    let grant = fx.grant_from_runner(
        &fx.token(),
        &["--allow", "192.0.2.10=9000", "--lifetime", "10m"],
    )?;
    // A plain client that waits for the server to speak first.
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let mut greeting = [0u8; 6];
    stream.read_exact(&mut greeting)?;
    ensure!(
        &greeting == b"HELLO\n",
        "server-first protocol through a source grant"
    );
    stream.write_all(b"ping")?;
    let mut back = [0u8; 4];
    stream.read_exact(&mut back)?;
    drop(stream);
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(closed["grant_id"] == grant.as_str(), "{closed}");
    ensure!(
        closed["bytes_down"] == 10
            && closed["kernel_bytes_up"] == 4
            && closed["kernel_bytes_down"].as_u64().unwrap_or(0)
                + closed["userspace_bytes_down"].as_u64().unwrap_or(0)
                == 10,
        "{closed}"
    );
    // The grant was narrowed to port 9000: 5432 still needs a preamble.
    let mut other = fx.dial_from_runner(AuthFixture::target(5432))?;
    other.write_all(b"not a preamble")?;
    let mut rest = Vec::new();
    let _ = other.read_to_end(&mut rest);
    let denied = &wait_events(&fx.agent, "connection_denied", 1)?[0];
    ensure!(denied["destination"] == "192.0.2.10:5432", "{denied}");
    server.stop()?;
    Ok(())
}

/// Two runners behind one bastion (two source addresses): only the one
/// holding the grant gets through.
#[test]
fn two_runners_one_grant() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let second = Ipv4Addr::new(198, 51, 100, 3);
    fx.topo
        .runner
        .ip(["addr", "add", "198.51.100.3/24", "dev", "eth0"])?;
    let server = tcpgate_tests::auth_fixture::echo_service(&fx, b"HELLO\n")?;
    fx.grant_from_runner(&fx.token(), &[])?;
    let target = AuthFixture::target(9000);
    let mut granted = fx.dial_from_runner(target)?;
    let mut greeting = [0u8; 6];
    granted.read_exact(&mut greeting)?;
    ensure!(&greeting == b"HELLO\n", "the granted runner is admitted");
    let mut other = tcpgate_tests::dial_from(&fx.topo.runner, IpAddr::V4(second), target)?;
    other.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut rest = Vec::new();
    let _ = other.read_to_end(&mut rest);
    ensure!(
        rest.is_empty(),
        "the second runner got data without a grant"
    );
    let denied = &wait_events(&fx.agent, "connection_denied", 1)?[0];
    ensure!(
        denied["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("198.51.100.3:")),
        "{denied}"
    );
    ensure!(
        denied["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("timeout")),
        "no preamble arrived: {denied}"
    );
    drop(granted);
    server.stop()?;
    Ok(())
}

/// A session streaming data when its grant expires is torn down: both
/// sides closed, the reason recorded, the map entries gone.
#[test]
fn expiry_tears_down_a_streaming_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = streamer(&fx, Duration::from_secs(60))?;
    let exp = unix_now() + 4;
    let token = fx.keys.rsa.sign(&claims_with(&[("exp", json!(exp))]));
    fx.grant_from_runner(&token, &[])?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(5432))?;
    let (received, ended_at) = read_until_end(&mut stream);
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
    ensure!(
        received > 64 * 1024,
        "the session streamed before expiry ({received} bytes)"
    );
    ensure!(
        ended_at >= expiry,
        "the session must not end before its grant"
    );
    eprintln!(
        "teardown observed by the client {:?} after expiry",
        ended_at.duration_since(expiry).unwrap_or_default()
    );
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(closed["reason"] == "grant_expired", "{closed}");
    // The kernel moved all of it but the server's first bytes, which the
    // agent relays (at most GREETING_LIMIT) until the silent client speaks,
    // and, when the limit cut a segment, what was queued behind it (copied
    // before the splice: at most the socket's receive buffer, 6 MiB by
    // default).
    let kernel = closed["kernel_bytes_down"].as_u64().unwrap_or(0);
    let copied = closed["userspace_bytes_down"].as_u64().unwrap_or(0);
    // A loaded client may also hold the stream back: backpressure copies
    // are the agent's too, and counted apart.
    let backpressure = closed["backpressure_bytes_down"].as_u64().unwrap_or(0);
    let relayed = copied.saturating_sub(backpressure);
    // The counters are what the bastion forwarded. The reset at expiry
    // discards what was still queued towards the client (its socket's
    // unsent bytes and the psock backlog, both bounded by the spliced
    // socket's send buffer, which the kernel doubles), so the client may
    // have got less, never more.
    let forwarded = kernel + copied;
    let queue_bound: u64 = 2 * (8 << 20); // agent.splice_sndbuf defaults to 8 MiB
    ensure!(
        received <= forwarded
            && forwarded - received <= queue_bound
            && relayed <= 16 * 1024 + (6 << 20),
        "client got {received} bytes, the bastion forwarded {forwarded} \
         (at most {queue_bound} lost in its queues at the reset): {closed}"
    );
    eprintln!(
        "lost in the bastion's queues at the reset: {} bytes",
        forwarded - received
    );
    let sent = server.stop()?;
    ensure!(sent.len() == 1, "one upstream connection");
    tcpgate_tests::assert_maps_empty(fx.agent.pin_dir())?;
    Ok(())
}

/// `tcpgate revoke` ends a live session at once, and the source is no
/// longer admitted.
#[test]
fn revoke_by_id_and_by_subject() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = streamer(&fx, Duration::from_secs(60))?;
    let admin = fx.admin_socket().display().to_string();
    for (round, by_subject) in [(1, false), (2, true)] {
        // Each round is a new CI job: a new token id. Revoking a grant
        // denies its token's jti, so the first round's token is spent.
        let token = fx
            .keys
            .rsa
            .sign(&claims_with(&[("jti", json!(format!("job-{round}")))]));
        let grant = fx.grant_from_runner(&token, &[])?;
        let mut stream = fx.dial_from_runner(AuthFixture::target(5432))?;
        let mut first = [0u8; 1024];
        stream.read_exact(&mut first)?;
        let subject = "project_path:group/app:ref_type:branch:ref:release/1.4";
        let args: Vec<&str> = if by_subject {
            vec!["revoke", "--admin", &admin, "--subject", subject]
        } else {
            vec!["revoke", "--admin", &admin, &grant]
        };
        let (status, stdout, stderr) = fx.cli(&fx.topo.bastion, &args)?;
        ensure!(
            status == 0 && stdout.contains("revoked grant"),
            "revoke: {status} {stdout} {stderr}"
        );
        let (_, _) = read_until_end(&mut stream);
        let closed = &wait_events(&fx.agent, "session_close", round)?[round - 1];
        ensure!(
            closed["reason"] == "revoked" && closed["grant_id"] == grant.as_str(),
            "{closed}"
        );
    }
    // No grant left: a plain connection is refused.
    let mut stream = fx.dial_from_runner(AuthFixture::target(5432))?;
    stream.write_all(b"hello")?;
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    ensure!(rest.is_empty(), "revoked source still admitted");
    let (status, _, stderr) = fx.cli(
        &fx.topo.bastion,
        &["revoke", "--admin", &admin, "00000000deadbeef"],
    )?;
    ensure!(
        status != 0 && stderr.contains("no live grant"),
        "unknown grant: {stderr}"
    );
    server.stop()?;
    Ok(())
}

/// `tcpgate connect`: stdin/stdout relay (ssh ProxyCommand style) and a
/// local port forward, both with a per-connection preamble.
#[test]
fn connect_helper_relays_and_forwards() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = tcpgate_tests::auth_fixture::echo_service(&fx, b"HELLO\n")?;
    let token_file = fx.token_file(&fx.token())?;
    let token_path = token_file.to_str().context("utf-8")?;

    let output = fx
        .topo
        .runner
        .command("sh")
        .args([
            "-c",
            &format!(
                "printf 'over stdin' | {} connect --token-file {token_path} 192.0.2.10:9000",
                fx.agent.binary().display()
            ),
        ])
        .output()?;
    ensure!(
        output.status.success(),
        "connect: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.stdout == b"HELLO\nover stdin",
        "relay output: {:?}",
        String::from_utf8_lossy(&output.stdout)
    );

    let mut forward = fx.topo.runner.command(fx.agent.binary());
    forward.args([
        "connect",
        "--token-file",
        token_path,
        "--listen",
        "127.0.0.1:15000",
        "192.0.2.10:9000",
    ]);
    let forwarder = ChildGuard::spawn_logged(&mut forward, fx.agent.dir(), "forwarder")?;
    let addr: SocketAddr = "127.0.0.1:15000".parse()?;
    let mut local = tcpgate_tests::eventually(
        Duration::from_secs(10),
        "the forwarder to listen on 127.0.0.1:15000",
        || fx.topo.runner.run(move || TcpStream::connect(addr)).ok(),
    )?;
    local.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut greeting = [0u8; 6];
    local.read_exact(&mut greeting)?;
    write_payload(&mut local, &Payload::new(9, 1000))?;
    let mut back = vec![0u8; 1000];
    local.read_exact(&mut back)?;
    ensure!(back == Payload::new(9, 1000).to_vec(), "forwarded echo");
    // A relay sends at once on both of its sockets (see tests/nodelay.rs).
    let held = tcpgate_tests::held_sockets::held_connections(forwarder.pid())?;
    let local_side = local.local_addr()?;
    for peer in [local_side, "192.0.2.10:9000".parse()?] {
        ensure!(
            held.iter().any(|c| c.peer == peer && c.nodelay),
            "the forwarder's socket to {peer} without TCP_NODELAY: {held:?}"
        );
    }
    drop((local, forwarder));

    let bad_token = fx.token_file(
        &fx.keys
            .rsa
            .sign(&claims_with(&[("project_path", json!("group/other"))])),
    )?;
    let output = fx
        .topo
        .runner
        .command(fx.agent.binary())
        .args([
            "connect",
            "--token-file",
            bad_token.to_str().context("utf-8")?,
            "192.0.2.10:9000",
        ])
        .output()?;
    ensure!(
        output.status.code() == Some(77),
        "denied exit status: {:?}",
        output.status
    );
    ensure!(
        String::from_utf8_lossy(&output.stderr).contains("access denied (no_rule_matched)")
            && !String::from_utf8_lossy(&output.stderr).contains("deploy"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.stop()?;
    Ok(())
}
