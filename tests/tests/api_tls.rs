//! The grant API over HTTPS, from the runner's side: `tcpgate grant --ca`
//! with a private CA, a wrong CA and no CA (clear refusals), a plain
//! `openssl req -x509` certificate, and a dual-stack runner that gets a
//! grant per family from one `tcpgate grant`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::auth::{AuthFixture, Launch, policy};
use serde_json::Value;
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
