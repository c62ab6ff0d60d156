//! The splice data path, on both implementations: byte-exact transfers in
//! each direction, half-closes, server-first protocols and early bytes.
//! Many concurrent sessions and slow readers are in datapath_memory.rs,
//! upstream failures in datapath_upstream.rs.
//!
//! Every test checks SHA-256 digests on both ends, and reads the session's
//! byte counters from the audit line, which the agent takes from the eBPF
//! session map on the kernel path: kernel bytes must equal the payload and
//! user-space bytes must be zero.

use std::io::{Read, Write};
use std::net::Shutdown;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::{DataPath, ForwardFixture};
use tcpgate_tests::{Payload, read_exact_hashed, read_to_end_hashed, serve_once, write_payload};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

tcpgate_tests::on_every_path!(
    small_payloads_each_direction,
    immediate_half_close_is_byte_exact,
    one_gib_upstream,
    one_gib_downstream,
    client_half_close_then_long_reply,
    server_half_close_then_long_reply,
    server_speaks_first,
    bytes_sent_before_splice_are_kept,
);

/// The server greets with one byte; once the client has it, the splice is
/// in place (on the kernel path the byte came through the verdict), so what
/// follows, the half-close included, is carried by the path under test.
const GREETING: u8 = b'!';

/// Client sends `up` bytes and half-closes; the server sends `down` bytes
/// and closes. Returns after both digests were checked. The down direction
/// carries one extra byte, the greeting.
fn exchange(fx: &ForwardFixture, seed: u64, up: u64, down: u64) -> Result<()> {
    let request = Payload::new(seed, up);
    let reply = Payload::new(seed + 1, down);
    let server = serve_once(
        &fx.topo.target,
        fx.upstream_addr(),
        move |mut stream, _| -> Result<_> {
            stream.write_all(&[GREETING])?;
            let (len, digest) = read_to_end_hashed(&mut stream)?;
            write_payload(&mut stream, &reply)?;
            stream.shutdown(Shutdown::Write)?;
            Ok((len, digest))
        },
    )?;
    let mut client = fx.dial()?;
    let mut greeting = [0u8; 1];
    client.read_exact(&mut greeting)?;
    ensure!(greeting[0] == GREETING, "greeting");
    write_payload(&mut client, &request)?;
    client.shutdown(Shutdown::Write)?;
    let (got_len, got_digest) = read_to_end_hashed(&mut client)?;
    let (server_len, server_digest) = server.join()??;
    ensure!(
        server_len == up && server_digest == request.digest(),
        "upstream got {server_len} bytes, digest mismatch"
    );
    ensure!(
        got_len == down && got_digest == reply.digest(),
        "client got {got_len} bytes, digest mismatch"
    );
    Ok(())
}

fn small_payloads_each_direction(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    let cases = [
        (0, 0),
        (1, 0),
        (0, 1),
        (64 * KIB, 0),
        (0, 64 * KIB),
        (1, 64 * KIB),
    ];
    for (i, (up, down)) in cases.iter().enumerate() {
        exchange(&fx, i as u64 * 10, *up, *down)
            .with_context(|| format!("case up={up} down={down}\n{}", fx.dump()))?;
        let closed = fx.wait_closed(i + 1)?;
        fx.assert_bytes(&closed[i], *up, *down + 1)?;
    }
    fx.assert_maps_empty()
}

/// A client that writes and half-closes at once may close before the
/// sockets can join the SOCKHASH (the kernel takes only ESTABLISHED
/// sockets). Such a session is copied in user space instead, and says so;
/// either way every byte arrives.
fn immediate_half_close_is_byte_exact(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    let cases = [(0, 0), (1, 0), (1, 1), (64 * KIB, 64 * KIB)];
    for (i, (up, down)) in cases.iter().enumerate() {
        let request = Payload::new(900 + i as u64, *up);
        let reply = Payload::new(950 + i as u64, *down);
        fx.half_close_exchange(request, reply)
            .with_context(|| format!("case {i}"))?;
        let closed = &fx.wait_closed(i + 1)?[i];
        ensure!(
            closed["bytes_up"] == *up && closed["bytes_down"] == *down,
            "case {i}: {closed}"
        );
        if !path.may_say(&closed["datapath"]) {
            ensure!(
                path == DataPath::Ebpf
                    && closed["datapath"] == "userspace"
                    && closed["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("half-closed")),
                "case {i}: only an early half-close may move a session off the kernel path: {closed}"
            );
        }
    }
    fx.assert_maps_empty()
}

fn one_gib_upstream(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    exchange(&fx, 100, GIB, 0).with_context(|| fx.dump())?;
    fx.assert_bulk_bytes(&fx.wait_closed(1)?[0], GIB, 1)?;
    fx.assert_maps_empty()
}

fn one_gib_downstream(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    exchange(&fx, 200, 0, GIB).with_context(|| fx.dump())?;
    fx.assert_bulk_bytes(&fx.wait_closed(1)?[0], 0, GIB + 1)?;
    fx.assert_maps_empty()
}

/// The classic half-close: the client's FIN must reach the server only
/// after every byte before it, and the reply must still flow afterwards.
fn client_half_close_then_long_reply(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    exchange(&fx, 300, MIB, 64 * MIB).with_context(|| fx.dump())?;
    fx.assert_bulk_bytes(&fx.wait_closed(1)?[0], MIB, 64 * MIB + 1)?;
    fx.assert_maps_empty()
}

fn server_half_close_then_long_reply(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    let banner = Payload::new(400, MIB);
    let upload = Payload::new(401, 64 * MIB);
    let server = serve_once(
        &fx.topo.target,
        fx.upstream_addr(),
        move |mut stream, _| -> Result<_> {
            write_payload(&mut stream, &banner)?;
            stream.shutdown(Shutdown::Write)?;
            read_to_end_hashed(&mut stream).map_err(Into::into)
        },
    )?;
    let mut client = fx.dial()?;
    let (len, digest) = read_to_end_hashed(&mut client)?;
    ensure!(
        len == MIB && digest == banner.digest(),
        "client got {len} bytes of the server's stream"
    );
    write_payload(&mut client, &upload)?;
    client.shutdown(Shutdown::Write)?;
    let (len, digest) = server.join()??;
    ensure!(
        len == 64 * MIB && digest == upload.digest(),
        "server got {len} bytes after its half-close"
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest)?;
    ensure!(rest.is_empty(), "nothing may follow the server's FIN");
    fx.assert_bulk_bytes(&fx.wait_closed(1)?[0], 64 * MIB, MIB)?;
    fx.assert_maps_empty()
}

/// The upstream writes first (like SSH or SMTP); the client waits for it.
fn server_speaks_first(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    let banner = Payload::new(500, 4 * KIB);
    let request = Payload::new(501, 256 * KIB);
    let response = Payload::new(502, 256 * KIB);
    let server = serve_once(
        &fx.topo.target,
        fx.upstream_addr(),
        move |mut stream, _| -> Result<_> {
            write_payload(&mut stream, &banner)?;
            let digest = read_exact_hashed(&mut stream, request.len)?;
            write_payload(&mut stream, &response)?;
            stream.shutdown(Shutdown::Write)?;
            Ok(digest)
        },
    )?;
    let mut client = fx.dial()?;
    ensure!(
        read_exact_hashed(&mut client, banner.len)? == banner.digest(),
        "banner digest"
    );
    write_payload(&mut client, &request)?;
    ensure!(
        read_exact_hashed(&mut client, response.len)? == response.digest(),
        "response digest"
    );
    ensure!(server.join()?? == request.digest(), "request digest");
    client.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    client.read_to_end(&mut rest)?;
    fx.assert_bytes(
        &fx.wait_closed(1)?[0],
        request.len,
        banner.len + response.len,
    )?;
    fx.assert_maps_empty()
}

/// The target drops the first SYN, so the agent's upstream connect takes a
/// retransmission (about a second) while the client's first bytes wait in
/// the client socket: they must reach the upstream, through the kernel path.
fn bytes_sent_before_splice_are_kept(path: DataPath) -> Result<()> {
    let fx = ForwardFixture::start(path)?;
    fx.topo
        .target
        .exec_ok(&["nft", "add", "table", "inet", "tgtest"])?;
    fx.topo.target.exec_ok(&[
        "nft",
        "add",
        "chain",
        "inet",
        "tgtest",
        "input",
        "{ type filter hook input priority 0; }",
    ])?;
    let port = tcpgate_tests::UPSTREAM_PORT.to_string();
    fx.topo.target.exec_ok(&[
        "nft", "add", "rule", "inet", "tgtest", "input", "tcp", "dport", &port, "tcp", "flags",
        "syn", "quota", "until", "100", "bytes", "drop",
    ])?;
    let early = Payload::new(600, 48 * KIB);
    let reply = Payload::new(601, MIB);
    let server = serve_once(
        &fx.topo.target,
        fx.upstream_addr(),
        move |mut stream, _| -> Result<_> {
            let digest = read_exact_hashed(&mut stream, early.len)?;
            write_payload(&mut stream, &reply)?;
            stream.shutdown(Shutdown::Write)?;
            Ok(digest)
        },
    )?;
    let mut client = fx.dial()?;
    write_payload(&mut client, &early)?;
    ensure!(
        read_exact_hashed(&mut client, reply.len)? == reply.digest(),
        "reply digest"
    );
    ensure!(
        server.join()?? == early.digest(),
        "early bytes lost or reordered"
    );
    client.shutdown(Shutdown::Write)?;
    let closed = &fx.wait_closed(1)?[0];
    fx.assert_bytes(closed, early.len, reply.len)?;
    if path == DataPath::Ebpf {
        ensure!(
            closed["early_bytes_up"].as_u64() == Some(early.len),
            "all early bytes should have been queued before the splice: {closed}"
        );
    }
    fx.assert_maps_empty()
}
