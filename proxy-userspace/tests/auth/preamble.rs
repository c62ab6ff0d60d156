//! The preamble wire format, its errors, and the no-over-read guarantee.

use std::time::Duration;

use tcpgate::auth::preamble::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
const DEADLINE: Duration = Duration::from_secs(5);

fn raw(version: u8, flags: u8, len: u16, body: &[u8]) -> Vec<u8> {
    let mut v = b"TCPG".to_vec();
    v.extend_from_slice(&[version, flags]);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[test]
fn encode_then_parse_round_trips_and_reports_consumed_length() {
    let mut bytes = encode_preamble(TOKEN).expect("encode");
    assert_eq!(
        &bytes[..8],
        &[b'T', b'C', b'P', b'G', 1, 0, 0, TOKEN.len() as u8]
    );
    bytes.extend_from_slice(b"SSH-2.0-client\r\n");
    let (p, used) = parse_preamble(&bytes).expect("parse");
    assert_eq!(
        (p.version, p.token.as_str(), used),
        (1, TOKEN, 8 + TOKEN.len())
    );
    assert_eq!(&bytes[used..], b"SSH-2.0-client\r\n");
}

#[test]
fn every_proper_prefix_needs_more() {
    let bytes = encode_preamble(TOKEN).expect("encode");
    for cut in 0..bytes.len() {
        match parse_preamble(&bytes[..cut]) {
            Err(PreambleError::NeedMore(n)) => {
                assert!(n >= 1 && cut + n <= bytes.len(), "cut {cut}: {n}")
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn parse_errors_are_specific() {
    let cases: [(Vec<u8>, &str); 8] = [
        (b"GET / HTTP/1.1\r\n".to_vec(), "bad_magic"),
        (b"\x16\x03\x01".to_vec(), "bad_magic"),
        (raw(2, 0, 3, b"a.b"), "unsupported_version"),
        (raw(1, 0x80, 3, b"a.b"), "bad_flags"),
        (raw(1, 0, u16::MAX, b""), "oversized"),
        (raw(1, 0, 0, b""), "empty_token"),
        (raw(1, 0, 2, &[0xff, 0xfe]), "invalid_utf8"),
        (raw(1, 0, 10, b"abc"), "need_more"),
    ];
    for (bytes, want) in cases {
        let e = parse_preamble(&bytes).expect_err("must fail");
        assert_eq!(e.reason(), want, "{bytes:?}: {e}");
    }
    assert!(matches!(
        encode_preamble(&"x".repeat(MAX_TOKEN_LEN + 1)),
        Err(PreambleError::Oversized { .. })
    ));
    assert!(matches!(
        encode_preamble(""),
        Err(PreambleError::EmptyToken)
    ));
    let biggest = encode_preamble(&"x".repeat(MAX_TOKEN_LEN)).expect("largest token fits");
    assert_eq!(biggest.len(), MAX_PREAMBLE);
}

#[test]
fn random_input_never_panics() {
    let valid = encode_preamble(TOKEN).expect("encode");
    for i in 0..5000u32 {
        let len = (i as usize * 7) % 64;
        let mut bytes: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
        if i % 2 == 0 {
            // Keep a valid header prefix so the deeper checks get exercised.
            let keep = (i as usize) % (valid.len() + 1);
            bytes.splice(0..0, valid[..keep].iter().copied());
        }
        let _ = parse_preamble(&bytes);
        let _ = parse_response(&bytes);
    }
}

#[tokio::test]
async fn reader_leaves_the_bytes_after_the_preamble_in_the_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // Preamble and protocol bytes in a single write, so they share a segment.
        let mut bytes = encode_preamble(TOKEN).expect("encode");
        bytes.extend_from_slice(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"); // a PostgreSQL SSLRequest
        s.write_all(&bytes).await.expect("write");
        s.shutdown().await.expect("shutdown");
    });
    let (mut server, _) = listener.accept().await.expect("accept");
    client.await.expect("client");
    let p = read_preamble(&mut server, DEADLINE, MAX_TOKEN_LEN)
        .await
        .expect("preamble");
    assert_eq!(p.token, TOKEN);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.expect("read rest");
    assert_eq!(rest, b"\x00\x00\x00\x08\x04\xd2\x16\x2f");
}

#[tokio::test]
async fn reader_errors_are_specific() {
    let cases: [(Vec<u8>, &str); 6] = [
        (b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), "bad_magic"),
        (raw(9, 0, 3, b"a.b"), "unsupported_version"),
        (raw(1, 1, 3, b"a.b"), "bad_flags"),
        (raw(1, 0, 0x4000, b"x"), "oversized"),
        (raw(1, 0, 0, b""), "empty_token"),
        (raw(1, 0, 1, b"\xc3"), "invalid_utf8"),
    ];
    for (bytes, want) in cases {
        let mut r: &[u8] = &bytes;
        let e = read_preamble(&mut r, DEADLINE, MAX_TOKEN_LEN)
            .await
            .expect_err("must fail");
        assert_eq!(e.reason(), want, "{e}");
    }
    let truncated = raw(1, 0, 10, b"abc");
    let e = read_preamble(&mut &truncated[..], DEADLINE, MAX_TOKEN_LEN)
        .await
        .expect_err("must fail");
    assert!(
        matches!(
            e,
            PreambleError::Truncated {
                received: 11,
                expected: 18
            }
        ),
        "{e:?}"
    );
    let e = read_preamble(&mut &b"TCP"[..], DEADLINE, MAX_TOKEN_LEN)
        .await
        .expect_err("must fail");
    assert!(
        matches!(
            e,
            PreambleError::Truncated {
                received: 3,
                expected: 8
            }
        ),
        "{e:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_client_hits_the_deadline_for_the_whole_preamble() {
    let (mut client, mut server) = tokio::io::duplex(64);
    let start = tokio::time::Instant::now();
    let trickle = tokio::spawn(async move {
        // One byte a second: each read makes progress, the whole never ends.
        let bytes = encode_preamble(TOKEN).expect("encode");
        for b in bytes {
            if client.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let e = read_preamble(&mut server, DEADLINE, MAX_TOKEN_LEN)
        .await
        .expect_err("must time out");
    assert_eq!(e.reason(), "timeout");
    assert_eq!(
        start.elapsed(),
        DEADLINE,
        "paused clock: the deadline covers the whole preamble"
    );
    drop(server);
    trickle.await.expect("trickle task");
}

#[tokio::test]
async fn responses_round_trip_and_are_read_exactly() {
    let mut bytes = encode_response(Status::Denied, "token expired");
    bytes.extend_from_slice(b"after");
    let (r, used) = parse_response(&bytes).expect("parse");
    assert_eq!(
        (r.status, r.message.as_str(), &bytes[used..]),
        (Status::Denied, "token expired", &b"after"[..])
    );
    let mut reader: &[u8] = &bytes;
    let r = read_response(&mut reader, DEADLINE).await.expect("read");
    assert_eq!(
        (r.status, r.message.as_str(), reader),
        (Status::Denied, "token expired", &b"after"[..])
    );
    let ok = parse_response(&encode_response(Status::Ok, ""))
        .expect("ok")
        .0;
    assert_eq!((ok.status, ok.message.as_str()), (Status::Ok, ""));
    // Long messages are cut at a character boundary within 1024 bytes.
    let long = "é".repeat(600);
    let (r, _) = parse_response(&encode_response(Status::Error, &long)).expect("long");
    assert_eq!((r.status, r.message.len()), (Status::Error, 1024));
    let mut bad = encode_response(Status::Ok, "x");
    bad[5] = 7;
    assert_eq!(
        parse_response(&bad).err().map(|e| e.reason()),
        Some("bad_status")
    );
    let oversized = raw(1, 1, 2000, b"");
    assert_eq!(
        parse_response(&oversized).err().map(|e| e.reason()),
        Some("oversized")
    );
}

#[tokio::test]
async fn a_declared_length_over_the_configured_cap_is_refused_from_the_header() {
    // The header declares 4000 token bytes; none of them are sent. The cap
    // is checked on the declared length, so the refusal comes from the
    // header alone, not after waiting for (or allocating) the body.
    let header = raw(1, 0, 4000, b"");
    let e = read_preamble(&mut &header[..], DEADLINE, 1000)
        .await
        .expect_err("over the cap");
    assert!(
        matches!(
            e,
            PreambleError::Oversized {
                len: 4008,
                max: 1008
            }
        ),
        "{e:?}"
    );
    let ok = encode_preamble(TOKEN).expect("encode");
    let p = read_preamble(&mut &ok[..], DEADLINE, TOKEN.len())
        .await
        .expect("exactly at the cap");
    assert_eq!(p.token, TOKEN);
}

#[test]
fn openings_are_judged_by_the_magic_alone() {
    for partial in [&b""[..], b"T", b"TC", b"TCP"] {
        assert_eq!(opening(partial), Opening::Undecided, "{partial:?}");
    }
    for preamble in [&b"TCPG"[..], b"TCPG\x01\x00", b"TCPG\x09"] {
        assert_eq!(opening(preamble), Opening::Preamble, "{preamble:?}");
    }
    for other in [&b"SSH-2.0"[..], b"X", b"TX", b"TCPX", b"\x00\x00\x00\x08"] {
        assert_eq!(opening(other), Opening::Other, "{other:?}");
    }
}
