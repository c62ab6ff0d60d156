//! Token preambles: a valid token is admitted and its bytes relayed exactly,
//! without the token; every kind of bad token is refused before any
//! upstream connection exists.

use std::io::Write as _;
use std::net::Shutdown;

use serde_json::{Value, json};
use tcpgate_tests::preamble::{self, DENIED, OK};
use tcpgate_tests::tokens::{TestKey, claims_with, gitlab_claims, unix_now};
use tcpgate_tests::{Digest, Payload, read_to_end_hashed};

use crate::harness::{Harness, PROJECT, contains, read_until_closed};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_is_admitted_and_relayed_byte_exact_both_ways() {
    let (up, down) = (Payload::new(1, MIB), Payload::new(2, MIB));
    let mut h = Harness::start(down).await;
    let claims = gitlab_claims();
    let token = h.key.sign(&claims);
    let mut client = h.dial().await;
    let sent = token.clone();
    let (answer, received) = tokio::task::spawn_blocking(move || {
        // The preamble and the first payload bytes in one write: the agent
        // must cut the stream exactly where the preamble ends.
        let bytes = up.to_vec();
        let mut first = preamble::encode(&sent);
        first.extend_from_slice(&bytes[..1000]);
        client.write_all(&first)?;
        let answer = preamble::read_answer(&mut client)?;
        client.write_all(&bytes[1000..])?;
        client.shutdown(Shutdown::Write)?;
        Ok::<_, std::io::Error>((answer, read_to_end_hashed(&mut client)?))
    })
    .await
    .expect("client task")
    .expect("client I/O");

    assert_eq!(answer, (OK, "connected".to_owned()));
    assert_eq!(received, (down.len, down.digest()), "downstream bytes");
    let upstream_got = h.upstream.next_received().await;
    assert_eq!(upstream_got.len() as u64, up.len, "upstream byte count");
    assert_eq!(Digest::of(&upstream_got), up.digest(), "upstream bytes");
    assert!(
        !contains(&upstream_got, token.as_bytes()),
        "the token reached the upstream"
    );
    let close = h.audit_event("session_close", |_| true).await;
    assert_eq!(close["datapath"], "userspace", "{close}");
    assert_eq!(close["bytes_up"], up.len, "{close}");
    assert_eq!(close["bytes_down"], down.len, "{close}");
    assert_eq!(close["subject"], claims["sub"], "{close}");
    assert_eq!(close["claims"]["project_path"], PROJECT, "{close}");
    assert_eq!(h.upstream.accepted(), 1);
}

/// What an attacker may send instead of a valid token.
struct Attempt {
    name: &'static str,
    /// `None`: plain protocol bytes, no preamble at all.
    token: Option<String>,
    /// The stable reason the audit line must give.
    reason: &'static str,
}

fn attempts(key: &TestKey) -> Vec<Attempt> {
    let now = unix_now();
    let signed = |changes: &[(&str, Value)]| Some(key.sign(&claims_with(changes)));
    vec![
        Attempt {
            name: "no token",
            token: None,
            reason: "bad_magic",
        },
        Attempt {
            name: "wrong issuer",
            token: signed(&[("iss", json!("https://gitlab.attacker.example"))]),
            reason: "wrong_issuer",
        },
        Attempt {
            name: "expired",
            token: signed(&[
                ("iat", json!(now - 7200)),
                ("nbf", json!(now - 7200)),
                ("exp", json!(now - 3600)),
            ]),
            reason: "token_expired",
        },
        Attempt {
            name: "someone else's subject",
            token: signed(&[
                ("project_path", json!("other/tool")),
                (
                    "sub",
                    json!("project_path:other/tool:ref_type:branch:ref:main"),
                ),
            ]),
            reason: "no_rule_matched",
        },
        Attempt {
            name: "forged signature",
            // The issuer's kid, signed with a key the issuer never published.
            token: Some(TestKey::rsa2(&key.kid).sign(&gitlab_claims())),
            reason: "bad_signature",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_before_any_upstream_connection() {
    let h = Harness::start(Payload::new(3, 4096)).await;
    for attempt in attempts(&h.key) {
        let mut client = h.dial().await;
        let token = attempt.token.clone();
        let (answer, rest) = tokio::task::spawn_blocking(move || {
            let first = match &token {
                Some(token) => preamble::encode(token),
                None => b"GET / HTTP/1.1\r\nHost: db\r\n\r\n".to_vec(),
            };
            // The request may be cut off by the refusal: ignore write errors.
            let _ = client.write_all(&first);
            let _ = client.write_all(b"payload after the preamble");
            let answer = token.is_some().then(|| preamble::read_answer(&mut client));
            // After a refusal the connection ends: EOF or a reset, no data.
            (answer, read_until_closed(&mut client))
        })
        .await
        .expect("client task");
        if let Some(answer) = answer {
            let (status, message) = answer.expect("an answer frame");
            assert_eq!(status, DENIED, "{}: {message}", attempt.name);
            assert_eq!(
                message,
                format!("access denied ({})", attempt.reason),
                "{}",
                attempt.name
            );
        }
        assert!(
            rest.is_empty(),
            "{}: got {} bytes",
            attempt.name,
            rest.len()
        );
        let denied = h
            .audit_event("connection_denied", move |e| {
                e["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(&format!("{}:", attempt.reason)))
            })
            .await;
        assert_eq!(denied["reason"], "auth_failed", "{denied}");
    }
    assert_eq!(
        h.upstream.accepted(),
        0,
        "a refused connection reached the upstream"
    );
    assert!(
        h.audit_events()
            .iter()
            .all(|e| e["event"] == "connection_denied"),
        "only denials: {:?}",
        h.audit_events()
    );
}
