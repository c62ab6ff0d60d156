//! The grant API over HTTPS, from the runner's side: `tcpgate grant --ca`
//! with a private CA, a wrong CA and no CA (clear refusals), a plain
//! `openssl req -x509` certificate, and a dual-stack runner that gets a
//! grant per family from one `tcpgate grant`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, policy};
use tcpgate_tests::tokens::ISSUER;
use tcpgate_tests::topology::{RUNNER_V4, RUNNER_V6, TARGET_V4, TARGET_V6};
use tcpgate_tests::{accept_loop, require_root};

/// `tcpgate grant` from the runner with `extra` flags; (status, stdout,
/// stderr).
fn grant(fx: &AuthFixture, extra: &[&str]) -> Result<(i32, String, String)> {
    let file = fx.token_file(&fx.token())?;
    let mut args = vec!["grant", "--token-file", file.to_str().context("utf-8")?];
    args.extend_from_slice(extra);
    fx.cli(&fx.topo.runner, &args)
}

#[test]
fn grant_trusts_the_private_ca_and_refuses_others_plainly() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let api = AuthFixture::api_url();
    let ca = fx.api_ca.to_str().context("utf-8")?;
    let (status, stdout, stderr) = grant(&fx, &["--api", &api, "--ca", ca])?;
    ensure!(status == 0, "private CA: {status} {stderr}");
    ensure!(stdout.contains(&format!("from {RUNNER_V4}")), "{stdout}");
    // The old spelling still works.
    let (status, _, stderr) = grant(&fx, &["--api", &api, "--ca-file", ca])?;
    ensure!(status == 0, "--ca-file: {status} {stderr}");

    // Another CA: refused, saying which file and what to put in it.
    let other = tcpgate_tests::tls::self_signed(fx.agent.dir(), "other", &["198.51.100.1"]);
    let other_ca = other.trust.to_str().context("utf-8")?;
    let (status, _, stderr) = grant(&fx, &["--api", &api, "--ca", other_ca])?;
    ensure!(status == 1, "wrong CA accepted ({status}): {stderr}");
    let expected = format!(
        "presented a certificate that the CA file {other_ca} does not vouch for (UnknownIssuer); \
         --ca must hold the CA that signed the API's certificate"
    );
    ensure!(stderr.contains(&expected), "wrong CA: {stderr}");
    // No --ca: the system store does not know the test CA.
    let (status, _, stderr) = grant(&fx, &["--api", &api])?;
    ensure!(
        status == 1
            && stderr.contains("the system trust store does not vouch for")
            && stderr.contains("give its certificate with --ca FILE"),
        "system store ({status}): {stderr}"
    );
    // Plain HTTP to the HTTPS port gets no grant.
    let plain = api.replace("https://", "http://");
    let (status, _, stderr) = grant(&fx, &["--api", &plain, "--ca", ca])?;
    ensure!(status != 0, "plain HTTP got a grant: {stderr}");
    Ok(())
}

#[test]
fn grant_accepts_a_self_signed_api_certificate_given_as_the_ca() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let launch = Launch {
        self_signed_api: true,
        ..Launch::default()
    };
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    // `openssl req -x509` marks it CA:TRUE, which WebPKI refuses as a
    // server certificate; given as the --ca file itself, it is trusted,
    // as curl --cacert trusts it.
    let pem = fx.api_ca.to_str().context("utf-8")?;
    let (status, stdout, stderr) = grant(&fx, &["--api", &AuthFixture::api_url(), "--ca", pem])?;
    ensure!(status == 0, "self-signed as --ca: {status} {stderr}");
    ensure!(stdout.contains("grant "), "{stdout}");
    // Another file (the test CA) does not vouch for it.
    let test_ca = tcpgate_tests::tokens::key_files()
        .ca_pem
        .display()
        .to_string();
    let (status, _, stderr) = grant(&fx, &["--api", &AuthFixture::api_url(), "--ca", &test_ca])?;
    ensure!(
        status == 1 && stderr.contains("does not vouch for"),
        "a self-signed certificate needs itself as --ca ({status}): {stderr}"
    );
    Ok(())
}

/// Echoes one line on `addr` in the target namespace.
fn echo(fx: &AuthFixture, addr: SocketAddr) -> Result<tcpgate_tests::AcceptLoop<()>> {
    Ok(accept_loop(&fx.topo.target, addr, 10, |mut stream, _| {
        let mut buf = [0u8; 64];
        if let Ok(n) = stream.read(&mut buf) {
            let _ = stream.write_all(&buf[..n]);
        }
    })?)
}

/// A plain client from the runner: sends `hello`, returns the answer
/// (empty when the agent refused the connection).
fn hello(fx: &AuthFixture, addr: SocketAddr) -> Result<Vec<u8>> {
    let mut stream = fx
        .topo
        .runner
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(b"hello")?;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    Ok(answer)
}

#[test]
fn dual_stack_runner_reaches_ipv4_and_ipv6_targets_after_one_grant() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let rule = format!(
        "\n[[policy]]\nname = \"dual\"\nissuer = {ISSUER:?}\nmax_lifetime = \"15m\"\n\
         match = {{ project_path = \"group/app\" }}\n\
         allow = [ {{ prefix = \"192.0.2.0/24\", ports = [\"9000\"] }}, \
         {{ prefix = \"2001:db8:2::/64\", ports = [\"9000\"] }} ]\n"
    );
    let fx = AuthFixture::start_with(&rule, &[])?;
    let v4 = SocketAddr::from((TARGET_V4, 9000));
    let v6 = SocketAddr::from((TARGET_V6, 9000));
    let servers = [echo(&fx, v4)?, echo(&fx, v6)?];
    for addr in [v4, v6] {
        ensure!(
            hello(&fx, addr)?.is_empty(),
            "{addr} reached without a grant"
        );
    }
    let ca = fx.api_ca.to_str().context("utf-8")?;
    let (v4_api, v6_api) = (AuthFixture::api_url(), AuthFixture::api_url_v6());
    let (status, stdout, stderr) = grant(
        &fx,
        &["--api", &v4_api, "--api", &v6_api, "--ca", ca, "--json"],
    )?;
    ensure!(status == 0, "dual-stack grant: {status} {stderr}");
    let grants: Value = serde_json::from_str(&stdout).with_context(|| stdout.clone())?;
    let sources: Vec<&str> = grants
        .as_array()
        .context("one grant per --api")?
        .iter()
        .filter_map(|g| g["source"].as_str())
        .collect();
    ensure!(
        sources == [RUNNER_V4.to_string(), RUNNER_V6.to_string()],
        "{grants:#}"
    );
    for addr in [v4, v6] {
        ensure!(
            hello(&fx, addr)? == b"hello",
            "{addr} not reached with its grant"
        );
    }
    for server in servers {
        server.stop()?;
    }
    Ok(())
}

/// The certificate the grant API serves to a new connection from the runner.
fn served_certificate(fx: &AuthFixture) -> Result<Vec<u8>> {
    let addr = SocketAddr::from((
        tcpgate_tests::topology::BASTION_RUNNER_V4,
        tcpgate_tests::auth_fixture::API_PORT,
    ));
    let tcp = fx
        .topo
        .runner
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = tcpgate_tests::tls::client(tcp, &fx.api_ca, &addr.ip().to_string())?;
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate")?;
    Ok(leaf.to_vec())
}

fn der(pem: &std::path::Path) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    Ok(rustls::pki_types::CertificateDer::from_pem_file(pem)?.to_vec())
}

#[test]
fn sighup_serves_a_renewed_api_certificate_and_keeps_it_over_a_broken_one() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut fx = AuthFixture::start()?;
    let (cert, key) = (
        fx.agent.dir().join("api.pem"),
        fx.agent.dir().join("api.key"),
    );
    ensure!(
        served_certificate(&fx)? == der(&cert)?,
        "the configured certificate"
    );
    // Renewal: a new leaf to the same paths, then a reload.
    let names = ["198.51.100.1", "2001:db8:100::1"];
    let renewed = tcpgate_tests::tls::ca_signed(fx.agent.dir(), "renewed", &names);
    std::fs::copy(&renewed.key, &key)?;
    std::fs::copy(&renewed.cert, &cert)?;
    let new = der(&cert)?;
    fx.agent.signal(tcpgate_tests::Signal::SIGHUP)?;
    tcpgate_tests::eventually(
        Duration::from_secs(20),
        "the renewed certificate served",
        || served_certificate(&fx).is_ok_and(|served| served == new),
    )?;
    // A broken file: refused with an error, the renewed pair stays.
    std::fs::write(&cert, "not a certificate\n")?;
    fx.agent.signal(tcpgate_tests::Signal::SIGHUP)?;
    tcpgate_tests::eventually(
        Duration::from_secs(20),
        "the bad certificate reported",
        || {
            fx.agent
                .logs_tail(100)
                .contains("cannot reload the grant API's certificate")
        },
    )?;
    ensure!(served_certificate(&fx)? == new, "the running pair stays");
    fx.grant_from_runner(&fx.token(), &[])?;
    Ok(())
}
