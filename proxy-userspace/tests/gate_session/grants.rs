//! Grants from the attacker's side: a source grant admits its own address
//! only, and revoking a subject ends its live session and its next try.

use std::io::Write as _;
use std::net::{IpAddr, Shutdown};
use std::time::SystemTime;

use tcpgate::auth::GrantId;
use tcpgate_tests::preamble::{self, DENIED, OK};
use tcpgate_tests::tokens::gitlab_claims;
use tcpgate_tests::{Digest, Payload, read_to_end_hashed};

use crate::harness::{BOUND, Harness, read_until_closed};

const GRANTED: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const NEIGHBOUR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

/// Creates a source grant for `source` from a valid token, as the grant
/// API does; returns its id.
async fn grant_source(h: &Harness, source: IpAddr) -> GrantId {
    let token = h
        .gate
        .validate(&h.key.sign(&gitlab_claims()))
        .await
        .expect("token validates");
    let now = SystemTime::now();
    let decision = h
        .gate
        .policy()
        .decide(&token, h.listen, now)
        .expect("policy allows the forward");
    h.gate
        .create_source_grant(&token, &decision, source, now)
        .expect("grant created")
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_grant_admits_its_source_and_no_other() {
    let (up, down) = (Payload::new(4, 256 * 1024), Payload::new(5, 256 * 1024));
    let mut h = Harness::start(down).await;
    let grant = grant_source(&h, GRANTED).await;

    // A neighbour on the same host, without a token: refused, and the
    // upstream never sees a connection.
    let mut neighbour = h.dial_from(NEIGHBOUR).await;
    let rest = tokio::task::spawn_blocking(move || {
        let _ = neighbour.write_all(b"SELECT secrets;\n");
        read_until_closed(&mut neighbour)
    })
    .await
    .expect("neighbour task");
    assert!(rest.is_empty(), "the neighbour got {} bytes", rest.len());
    let denied = h
        .audit_event("connection_denied", |e| {
            e["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("127.0.0.3:"))
        })
        .await;
    assert_eq!(denied["reason"], "auth_failed", "{denied}");
    assert_eq!(
        h.upstream.accepted(),
        0,
        "the neighbour reached the upstream"
    );

    // The granted address, with an unmodified client (no preamble).
    let mut client = h.dial_from(GRANTED).await;
    let received = tokio::task::spawn_blocking(move || {
        tcpgate_tests::write_payload(&mut client, &up)?;
        client.shutdown(Shutdown::Write)?;
        read_to_end_hashed(&mut client)
    })
    .await
    .expect("client task")
    .expect("client I/O");
    assert_eq!(received, (down.len, down.digest()), "downstream bytes");
    let upstream_got = h.upstream.next_received().await;
    assert_eq!(Digest::of(&upstream_got), up.digest(), "upstream bytes");
    let close = h.audit_event("session_close", |_| true).await;
    assert_eq!(close["grant_id"], grant.to_string(), "{close}");
    assert_eq!(h.upstream.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_subject_ends_its_live_session_and_its_next_try() {
    let down = Payload::new(6, 64 * 1024);
    let mut h = Harness::start(down).await;
    let claims = gitlab_claims();
    let token = h.key.sign(&claims);
    let mut client = h.dial().await;
    let sent = token.clone();
    let (answer, mut client) = tokio::task::spawn_blocking(move || {
        let answer = preamble::authenticate(&mut client, &sent)?;
        client.write_all(b"hello upstream")?;
        tcpgate_tests::read_exact_hashed(&mut client, down.len)?;
        Ok::<_, std::io::Error>((answer, client))
    })
    .await
    .expect("client task")
    .expect("client I/O");
    assert_eq!(answer.0, OK, "{answer:?}");
    assert_eq!(h.registry.len(), 1, "one live session");

    let subject = claims["sub"].as_str().expect("sub");
    let revoked = h.gate.revoke_subject(subject);
    assert_eq!(revoked.len(), 1, "the session's preamble grant");

    // The session ends without either peer closing it.
    let rest = tokio::task::spawn_blocking(move || read_until_closed(&mut client))
        .await
        .expect("client task");
    assert!(
        rest.is_empty(),
        "bytes after the revocation: {}",
        rest.len()
    );
    // The upstream's connection ends too. The revocation may cut the
    // client's last bytes off in flight; nothing else may arrive.
    let upstream_got = h.upstream.next_received().await;
    assert!(
        b"hello upstream".starts_with(&upstream_got),
        "{upstream_got:?}"
    );
    let close = h.audit_event("session_close", |_| true).await;
    assert_eq!(close["reason"], "revoked", "{close}");
    tokio::time::timeout(BOUND, h.registry.wait_empty())
        .await
        .expect("the session left the registry");

    // The same (still unexpired) token is refused from now on.
    let mut again = h.dial().await;
    let answer = tokio::task::spawn_blocking(move || preamble::authenticate(&mut again, &token))
        .await
        .expect("client task")
        .expect("an answer frame");
    assert_eq!(answer, (DENIED, "access denied (revoked)".to_owned()));
    assert_eq!(
        h.upstream.accepted(),
        1,
        "the revoked token reached the upstream"
    );
}
