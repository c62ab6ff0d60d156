//! The bounds of both HTTP servers, hit from the outside: headers dribbled
//! (slowloris) on the operator TCP port, on the grant API's TLS handshake
//! and inside TLS; a body that stops arriving; a body over the limit; a
//! connection flood over the cap. Each bound holds and is counted, a live
//! session keeps its bytes exact throughout, and a grant request succeeds
//! once the flood is shed.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tcpgate_tests::auth_fixture::{
    API_PORT, AuthFixture, Launch, authenticate, echo_service, policy,
};
use tcpgate_tests::eventually;
use tcpgate_tests::metrics::{parse, scrape_unix};
use tcpgate_tests::topology::BASTION_RUNNER_V4;
use tcpgate_tests::{Payload, read_exact_hashed, require_root, write_payload};

const ADMIN_TCP: &str = "127.0.0.1:9470";
const API_CAP: usize = 8;
const ADMIN_CAP: usize = 4;

fn api_addr() -> SocketAddr {
    SocketAddr::from((BASTION_RUNNER_V4, API_PORT))
}

/// Sends `bytes` one at a time, 200 ms apart, until the server closes the
/// connection; fails if it is still open after the whole input (at most
/// about 20 s).
fn dribble(stream: &mut (impl Read + Write), bytes: &[u8]) -> Result<()> {
    let mut buf = [0u8; 1024];
    for byte in bytes.iter().cycle().take(100) {
        if stream
            .write_all(&[*byte])
            .and_then(|()| stream.flush())
            .is_err()
        {
            return Ok(());
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => bail!("answered a dribbled request: {:?}", &buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Ok(()),
        }
    }
    bail!("still open after 100 dribbled bytes")
}

/// A TCP connection from `ns` with a 200 ms read timeout.
fn connect(ns: &tcpgate_tests::Netns, addr: SocketAddr) -> Result<TcpStream> {
    let stream = ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(stream)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the grant API from the runner, handshake done.
fn tls(fx: &AuthFixture) -> Result<Tls> {
    let tcp = connect(&fx.topo.runner, api_addr())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut stream = tcpgate_tests::tls::client(tcp, &fx.api_ca, &BASTION_RUNNER_V4.to_string())?;
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    stream
        .sock
        .set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(stream)
}

/// Reads until the server closes; what it sent.
fn read_to_close(stream: &mut impl Read) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..100 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    answer
}

/// One echo round trip of 64 KiB on the live session, checked by SHA-256.
fn round_trip(session: &mut TcpStream, seed: u64) -> Result<()> {
    let payload = Payload::new(seed, 64 * 1024);
    write_payload(session, &payload)?;
    let digest = read_exact_hashed(session, 64 * 1024)?;
    ensure!(
        digest == payload.digest(),
        "live session bytes changed (round {seed})"
    );
    Ok(())
}

#[test]
fn http_bounds_hold_and_the_agent_stays_responsive() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let secrets = tempfile::tempdir()?;
    let token_file = secrets.path().join("admin.token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef")?;
    let limits = "header_timeout = \"2s\"\nidle_timeout = \"2s\"\nmax_body = 1024\n";
    let launch = Launch {
        api_extra: format!("[api.limits]\n{limits}max_connections = {API_CAP}\n"),
        admin_extra: format!(
            "listen = \"{ADMIN_TCP}\"\ntoken_file = {token_file:?}\n[admin.limits]\n{limits}\
             max_connections = {ADMIN_CAP}\n"
        ),
        ..Launch::default()
    };
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    let echo = echo_service(&fx, b"")?;
    let mut session = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut session, &fx.token())?;
    ensure!(status == 0, "preamble refused: {message}");
    round_trip(&mut session, 1)?;

    // Slowloris: on the operator TCP port, on the API's TLS handshake, and
    // on the API's headers inside TLS.
    let mut admin = connect(&fx.topo.bastion, ADMIN_TCP.parse()?)?;
    dribble(
        &mut admin,
        b"GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    )?;
    let mut handshake = connect(&fx.topo.runner, api_addr())?;
    dribble(
        &mut handshake,
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
    )?;
    let mut inside = tls(&fx)?;
    dribble(
        &mut inside,
        b"POST /v1/grants HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    )?;
    round_trip(&mut session, 2)?;

    // A body that stops arriving, then one over the limit.
    let mut stalled = tls(&fx)?;
    stalled.write_all(
        b"POST /v1/grants HTTP/1.1\r\nHost: bastion\r\nAuthorization: Bearer a.b.c\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )?;
    let answer = read_to_close(&mut stalled);
    ensure!(answer.is_empty(), "a stalled body was answered: {answer:?}");
    let mut large = tls(&fx)?;
    large.write_all(
        b"POST /v1/grants HTTP/1.1\r\nHost: bastion\r\nAuthorization: Bearer a.b.c\r\n\
          Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
    )?;
    let answer = String::from_utf8_lossy(&read_to_close(&mut large)).into_owned();
    ensure!(
        answer.starts_with("HTTP/1.1 413"),
        "oversize body: {answer:?}"
    );
    // A head larger than max_header_bytes (16 KiB by default).
    let mut huge = tls(&fx)?;
    let filler = "a".repeat(1000);
    let mut head = String::from("POST /v1/grants HTTP/1.1\r\nHost: bastion\r\n");
    for i in 0..40 {
        head.push_str(&format!("X-Filler-{i}: {filler}\r\n"));
    }
    let _ = huge.write_all(head.as_bytes());
    let answer = String::from_utf8_lossy(&read_to_close(&mut huge)).into_owned();
    ensure!(
        answer.starts_with("HTTP/1.1 431"),
        "oversize head: {answer:?}"
    );
    round_trip(&mut session, 3)?;

    // A flood of silent connections, twice the cap: the extra ones are
    // closed at accept, the rest at the header timeout.
    let mut flood: Vec<TcpStream> = (0..2 * API_CAP)
        .map(|_| connect(&fx.topo.runner, api_addr()))
        .collect::<Result<_>>()?;
    for _ in 0..2 * ADMIN_CAP {
        flood.push(connect(&fx.topo.bastion, ADMIN_TCP.parse()?)?);
    }
    round_trip(&mut session, 4)?;
    let socket = fx.admin_socket();
    let hits = |limit: &str, server: &str| -> f64 {
        scrape_unix(&socket)
            .ok()
            .and_then(|text| parse(&text).ok())
            .map_or(0.0, |m| {
                m.count(
                    "tcpgate_http_limit_hits_total",
                    &[("server", server), ("limit", limit)],
                )
            })
    };
    // The operator socket has its own slots: scraping works meanwhile.
    eventually(
        Duration::from_secs(20),
        "connections over the caps refused",
        || {
            hits("max_connections", "api") >= API_CAP as f64
                && hits("max_connections", "admin") >= ADMIN_CAP as f64
        },
    )?;
    // Once the flood is shed, a runner gets its grant.
    eventually(Duration::from_secs(30), "a grant after the flood", || {
        fx.grant_from_runner(&fx.token(), &[]).is_ok()
    })?;
    drop(flood);
    round_trip(&mut session, 5)?;
    // The operator TCP port answers again once its flood is shed.
    let healthz = || -> bool {
        let Ok(mut admin) = connect(&fx.topo.bastion, ADMIN_TCP.parse().expect("addr")) else {
            return false;
        };
        let _ = admin.write_all(b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
        String::from_utf8_lossy(&read_to_close(&mut admin)).starts_with("HTTP/1.1 200")
    };
    eventually(Duration::from_secs(20), "/healthz after the flood", healthz)?;

    for (limit, server, at_least) in [
        ("header_timeout", "admin", 1.0),
        ("header_timeout", "api", 2.0),
        ("idle_timeout", "api", 1.0),
        ("max_body", "api", 1.0),
        ("max_header_bytes", "api", 1.0),
    ] {
        let counted = hits(limit, server);
        ensure!(
            counted >= at_least,
            "{server} {limit}: {counted} < {at_least}"
        );
    }
    drop(session);
    echo.stop().context("echo service")?;
    Ok(())
}
