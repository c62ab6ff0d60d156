//! What a routed grant does not route, from the runner's side: a
//! destination the grant does not cover, and a source holding two grants
//! (which one would the kernel pick?), both take the intercepting path,
//! where the policy decides. Nothing reaches a target the grant does not
//! cover.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use tcpgate_tests::auth_fixture::{AuthFixture, echo_service};
use tcpgate_tests::routed::routed_fixture;
use tcpgate_tests::tokens::claims_with;
use tcpgate_tests::{AcceptLoop, accept_loop, pinned_entries, require_root, wait_events};

const PORT: u16 = 9000;

/// A listener on the target's `port` that only counts who connects.
fn witness(fx: &AuthFixture, port: u16) -> Result<AcceptLoop<SocketAddr>> {
    Ok(accept_loop(
        &fx.topo.target,
        AuthFixture::target(port),
        10,
        |_, peer| peer,
    )?)
}

/// Writes `message` and returns what came back before the end.
fn exchange(fx: &AuthFixture, port: u16, message: &[u8]) -> Result<Vec<u8>> {
    let mut stream = fx.dial_from_runner(AuthFixture::target(port))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(message)?;
    let mut back = vec![0u8; message.len()];
    match stream.read_exact(&mut back) {
        Ok(()) => Ok(back),
        Err(_) => Ok(Vec::new()),
    }
}

fn flows(fx: &AuthFixture) -> Result<Vec<Value>> {
    pinned_entries(fx.agent.pin_dir(), "flows")
}

#[test]
fn a_destination_the_grant_does_not_cover_is_not_routed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let echo = echo_service(&fx, b"")?;
    let postgres = witness(&fx, 5432)?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    // 5432 is intercepted, and outside the grant.
    let back = exchange(&fx, 5432, b"not a preamble")?;
    ensure!(back.is_empty(), "nothing came back from 5432: {back:?}");
    wait_events(&fx.agent, "connection_denied", 1)?;
    ensure!(flows(&fx)?.is_empty(), "no routed flow for 5432");
    ensure!(
        postgres.stop()?.is_empty(),
        "the target's 5432 saw no connection"
    );
    // The same grant routes what it covers.
    ensure!(exchange(&fx, PORT, b"ping")? == b"ping", "9000 answers");
    let opened = &wait_events(&fx.agent, "session_open", 1)?[0];
    ensure!(opened["datapath"] == "routed", "{opened}");
    echo.stop()?;
    Ok(())
}

#[test]
fn a_source_holding_two_grants_is_not_routed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let echo = echo_service(&fx, b"")?;
    let mut grants = Vec::new();
    for jti in ["job-a", "job-b"] {
        let token = fx.keys.rsa.sign(&claims_with(&[("jti", json!(jti))]));
        grants.push(fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])?);
    }
    ensure!(exchange(&fx, PORT, b"ping")? == b"ping", "admitted");
    let opened = &wait_events(&fx.agent, "session_open", 1)?[0];
    ensure!(
        opened["datapath"] != "routed",
        "two grants: the intercepting path: {opened}"
    );
    ensure!(flows(&fx)?.is_empty(), "no routed flow");
    // With one grant left, the source is routed again.
    let admin = fx.admin_socket().display().to_string();
    let (status, out, err) =
        fx.cli(&fx.topo.bastion, &["revoke", "--admin", &admin, &grants[1]])?;
    ensure!(status == 0, "revoke: {out} {err}");
    ensure!(exchange(&fx, PORT, b"pong")? == b"pong", "admitted again");
    let opened = &wait_events(&fx.agent, "session_open", 2)?[1];
    ensure!(
        opened["datapath"] == "routed",
        "one grant: routed: {opened}"
    );
    echo.stop()?;
    Ok(())
}
