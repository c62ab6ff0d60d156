//! Routed grants with `target_sees = "bastion"`: the kernel's connection
//! tracking rewrites a routed flow's source to the bastion's address, so
//! the target needs no route back to the runners. The target here has
//! none: without the NAT nothing it sends could reach the runner. Byte
//! exactness both ways with the kernel's counters, expiry and revocation
//! (the agent's RSTs reach the target through the NAT), and a runner
//! without a grant still gets nothing through.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, echo_service};
use tcpgate_tests::routed::{ends_in_reset, exchange_half_closed, routed_fixture};
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::topology::BASTION_TARGET_V4;
use tcpgate_tests::{Payload, require_root, serve_once, wait_events};

const PORT: u16 = 9000;

/// Routed grants whose flows the target sees from the bastion; the
/// target's IPv4 default route (its way back to the runners) removed.
fn nat_fixture() -> Result<AuthFixture> {
    let fx = routed_fixture("target_sees = \"bastion\"")?;
    fx.topo.target.ip(["-4", "route", "del", "default"])?;
    Ok(fx)
}

#[test]
fn the_target_sees_the_bastion_byte_exact_both_ways() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = nat_fixture()?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let (up, down) = (Payload::new(11, 6 << 20), Payload::new(12, 2 << 20));
    let peer = exchange_half_closed(&fx, PORT, up, down)?;
    ensure!(
        peer.ip() == IpAddr::V4(BASTION_TARGET_V4),
        "the target saw {peer}"
    );
    let open = &wait_events(&fx.agent, "session_open", 1)?[0];
    ensure!(
        open["datapath"] == "routed",
        "routed, not terminated: {open}"
    );
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["kernel_bytes_up"] == up.len
            && closed["kernel_bytes_down"] == down.len
            && closed["reason"] == "client_closed",
        "FLOWS counters against the payload: {closed}"
    );
    Ok(())
}

/// The agent's RST toward the target carries the runner's address; the
/// connection tracking entry rewrites it like the flow's own packets, so
/// the target's socket ends too.
#[test]
fn expiry_and_revocation_reset_both_ends_through_the_nat() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = nat_fixture()?;
    let admin = fx.admin_socket().display().to_string();
    for (round, revoke) in [(1, false), (2, true)] {
        let token = fx.keys.rsa.sign(&claims_with(&[
            ("exp", json!(unix_now() + if revoke { 600 } else { 3 })),
            ("jti", json!(format!("nat-job-{round}"))),
        ]));
        let grant = fx.grant_from_runner(&token, &["--allow", "192.0.2.10=9000"])?;
        let server = serve_once(&fx.topo.target, AuthFixture::target(PORT), |mut s, peer| {
            let _ = s.write_all(b"up");
            (ends_in_reset(&mut s), peer)
        })?;
        let mut stream = fx.dial_from_runner(AuthFixture::target(PORT))?;
        let mut first = [0u8; 2];
        stream.read_exact(&mut first)?;
        if revoke {
            let (status, out, err) =
                fx.cli(&fx.topo.bastion, &["revoke", "--admin", &admin, &grant])?;
            ensure!(status == 0, "revoke: {out} {err}");
        }
        ensure!(
            ends_in_reset(&mut stream),
            "round {round}: the runner sees an RST"
        );
        let (reset, peer) = server.join()?;
        ensure!(
            peer.ip() == IpAddr::V4(BASTION_TARGET_V4),
            "round {round}: the target saw {peer}"
        );
        ensure!(reset, "round {round}: the target sees an RST");
        let closed = &wait_events(&fx.agent, "session_close", round)?[round - 1];
        let reason = if revoke { "revoked" } else { "grant_expired" };
        ensure!(closed["reason"] == reason, "{closed}");
    }
    Ok(())
}

/// The NAT chain rewrites what the tc program marked, nothing else: a
/// runner without a grant is intercepted and refused as before.
#[test]
fn no_grant_gets_nothing_through_the_nat() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = nat_fixture()?;
    let server = echo_service(&fx, b"")?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(PORT))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(b"not a preamble")?;
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    ensure!(rest.is_empty(), "nothing came back");
    wait_events(&fx.agent, "connection_denied", 1)?;
    ensure!(server.stop()?.is_empty(), "the target saw no connection");
    Ok(())
}
