//! The verifier against a stand-in STS on 127.0.0.1: what it forwards and
//! where, and every way STS can fail (refusal, 5xx, garbage, silence, too
//! many at once) ending in a denial with its own reason and metric.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::auth::aws::sigv4::Credentials;

const SERVER_ID: &str = "bastion-1";

/// How the stand-in answers.
#[derive(Clone, Copy)]
enum Answer {
    Identity,
    Refuse,
    Fail,
    Garbage,
    Hang,
}

const IDENTITY: &str = "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
<GetCallerIdentityResult><Arn>arn:aws:sts::123456789012:assumed-role/ci-deploy/job-1</Arn>\
<UserId>AROAEXAMPLE:job-1</UserId><Account>123456789012</Account></GetCallerIdentityResult>\
</GetCallerIdentityResponse>";
const REFUSAL: &str = "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidClientTokenId</Code>\
<Message>The security token included in the request is invalid.</Message></Error></ErrorResponse>";

/// A running stand-in: its URL, the requests it got, and a signal for
/// each one.
struct StandIn {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
    arrived: Arc<tokio::sync::Notify>,
}

/// Serves `answer` on 127.0.0.1.
async fn stand_in(answer: Answer) -> StandIn {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (log, signal) = (Arc::clone(&seen), Arc::clone(&arrived));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (log, signal) = (Arc::clone(&log), Arc::clone(&signal));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head and the (short, fixed) body arrive together.
                while !String::from_utf8_lossy(&buf).contains(request::BODY) {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                log.lock()
                    .expect("log")
                    .push(String::from_utf8_lossy(&buf).into_owned());
                signal.notify_one();
                let (status, body) = match answer {
                    Answer::Identity => ("200 OK", IDENTITY),
                    Answer::Refuse => ("403 Forbidden", REFUSAL),
                    Answer::Fail => ("503 Service Unavailable", ""),
                    Answer::Garbage => ("200 OK", "<html>captive portal</html>"),
                    Answer::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    StandIn { url, seen, arrived }
}

fn config(endpoint: &str, max_concurrent: usize) -> AwsConfig {
    AwsConfig {
        issuer: "aws".into(),
        sts_endpoint: endpoint.into(),
        server_id: SERVER_ID.into(),
        region: None,
        max_age: crate::auth::config::DurationSpec::from_duration(Duration::from_secs(300)),
        sts_timeout: crate::auth::config::DurationSpec::from_duration(Duration::from_millis(500)),
        max_concurrent,
        max_remembered: 2,
        ca_file: None,
    }
}

/// A token signed by a runner for `signed_url` (which the bastion ignores).
fn token(signed_url: &str) -> String {
    let creds = Credentials {
        access_key_id: "ASIAEXAMPLE".into(),
        secret_access_key: "secret".into(),
        session_token: Some("session".into()),
    };
    let url = reqwest::Url::parse(signed_url).expect("url");
    SignedRequest::sign(&url, "us-east-1", SERVER_ID, &creds, SystemTime::now()).encode()
}

fn calls(verifier: &AwsVerifier, result: &'static str) -> u64 {
    verifier
        .metrics
        .calls
        .get_or_create(&ResultLabels { result })
        .get()
}

#[tokio::test]
async fn the_identity_comes_from_the_configured_endpoint_never_the_request_url() {
    let StandIn { url, seen, .. } = stand_in(Answer::Identity).await;
    let verifier = AwsVerifier::new(&config(&url, 4)).expect("verifier");
    // Signed for a place of the runner's choosing: refused, and nothing
    // is sent there (or anywhere).
    let err = verifier
        .verify(&token("http://169.254.169.254:9/"), SystemTime::now())
        .await
        .expect_err("another host");
    assert!(
        matches!(err, AwsError::Request(RequestError::WrongHost { .. })),
        "{err}"
    );
    assert!(seen.lock().expect("log").is_empty());
    // Signed for the configured endpoint, whatever URL the request names.
    let mut request = SignedRequest::decode(&token(&url)).expect("decode");
    request.url = "http://169.254.169.254:9/latest/meta-data/".into();
    let id = verifier
        .verify(&request.encode(), SystemTime::now())
        .await
        .expect("identity");
    assert_eq!(
        id.subject,
        "arn:aws:sts::123456789012:assumed-role/ci-deploy/job-1"
    );
    assert_eq!(id.issuer, "aws");
    assert_eq!(id.claims["aws"]["role"], "ci-deploy");
    let seen = seen.lock().expect("log").clone();
    assert_eq!(seen.len(), 1);
    let head = seen[0].to_ascii_lowercase();
    // Forwarded as signed: the path, the server id, the signature.
    assert!(head.starts_with("post / http/1.1\r\n"), "{head}");
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    assert!(head.contains(&format!("\r\nhost: {host}\r\n")), "{head}");
    assert!(
        head.contains("\r\nx-tcpgate-server-id: bastion-1\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nauthorization: aws4-hmac-sha256 credential=asiaexample/"),
        "{head}"
    );
    assert!(seen[0].ends_with(request::BODY), "{}", seen[0]);
    assert_eq!(calls(&verifier, "ok"), 1);
    assert_eq!(calls(&verifier, "not_sent"), 1);
}

#[tokio::test]
async fn every_sts_failure_is_a_denial_with_its_reason() {
    for (answer, reason, result) in [
        (Answer::Refuse, DenyReason::StsRefused, "refused"),
        (Answer::Fail, DenyReason::StsUnavailable, "failed"),
        (Answer::Garbage, DenyReason::StsUnavailable, "failed"),
        (Answer::Hang, DenyReason::StsUnavailable, "timeout"),
    ] {
        let url = stand_in(answer).await.url;
        let verifier = AwsVerifier::new(&config(&url, 4)).expect("verifier");
        let err = verifier
            .verify(&token(&url), SystemTime::now())
            .await
            .expect_err("never admitted");
        assert_eq!(err.deny_reason(), reason, "{err}");
        assert_eq!(calls(&verifier, result), 1, "{err}");
        assert_eq!(verifier.metrics.in_flight.get(), 0);
        if let AwsError::Refused { detail, .. } = &err {
            assert!(detail.starts_with("InvalidClientTokenId:"), "{detail}");
        }
    }
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    drop(listener);
    let verifier = AwsVerifier::new(&config(&url, 4)).expect("verifier");
    let err = verifier
        .verify(&token(&url), SystemTime::now())
        .await
        .expect_err("denied");
    assert!(matches!(err, AwsError::Unreachable { .. }), "{err}");
    assert_eq!(err.deny_reason(), DenyReason::StsUnavailable);
}

#[tokio::test]
async fn calls_over_max_concurrent_are_refused_at_once() {
    let StandIn { url, seen, arrived } = stand_in(Answer::Hang).await;
    let verifier = Arc::new(AwsVerifier::new(&config(&url, 1)).expect("verifier"));
    let first = {
        let verifier = Arc::clone(&verifier);
        let token = token(&url);
        tokio::spawn(async move { verifier.verify(&token, SystemTime::now()).await })
    };
    // The first call holds the only slot once STS has its request.
    arrived.notified().await;
    assert_eq!(verifier.metrics.in_flight.get(), 1);
    let err = verifier
        .verify(&token(&url), SystemTime::now())
        .await
        .expect_err("busy");
    assert_eq!(err, AwsError::Busy(1));
    assert_eq!(err.deny_reason(), DenyReason::StsBusy);
    assert_eq!(calls(&verifier, "busy"), 1);
    assert!(matches!(
        first.await.expect("join"),
        Err(AwsError::Timeout(_))
    ));
    assert_eq!(
        seen.lock().expect("log").len(),
        1,
        "the busy call never reached STS"
    );
}

#[tokio::test]
async fn requests_failing_the_bastions_checks_never_reach_sts() {
    let StandIn { url, seen, .. } = stand_in(Answer::Identity).await;
    let mut other = config(&url, 4);
    other.server_id = "bastion-2".into();
    let verifier = AwsVerifier::new(&other).expect("verifier");
    let err = verifier
        .verify(&token(&url), SystemTime::now())
        .await
        .expect_err("wrong server id");
    assert_eq!(err.deny_reason(), DenyReason::AwsWrongServerId);
    let late = SystemTime::now() + Duration::from_secs(301);
    let verifier = AwsVerifier::new(&config(&url, 4)).expect("verifier");
    let err = verifier
        .verify(&token(&url), late)
        .await
        .expect_err("stale");
    assert_eq!(err.deny_reason(), DenyReason::AwsRequestStale);
    assert_eq!(calls(&verifier, "not_sent"), 1);
    assert!(seen.lock().expect("log").is_empty());
}

#[tokio::test]
async fn each_signed_request_is_used_once_and_the_memory_is_bounded() {
    let StandIn { url, seen, .. } = stand_in(Answer::Identity).await;
    let verifier = AwsVerifier::new(&config(&url, 4)).expect("verifier");
    let now = SystemTime::now();
    let once = token(&url);
    verifier.verify(&once, now).await.expect("first use");
    let err = verifier.verify(&once, now).await.expect_err("replay");
    assert_eq!(err.deny_reason(), DenyReason::AwsRequestReplayed);
    assert_eq!(
        seen.lock().expect("log").len(),
        1,
        "the replay never reached STS"
    );
    // max_remembered = 2: a third live request is refused, not forgotten.
    verifier
        .verify(&token(&url), now)
        .await
        .expect("second request");
    let err = verifier.verify(&token(&url), now).await.expect_err("full");
    assert_eq!(err, AwsError::TooManyRemembered(2));
    assert_eq!(verifier.metrics.remembered.get(), 2);
    // Once the first two age out of max_age, there is room again, and the
    // old request is refused by its date, not remembered for ever.
    let later = now + Duration::from_secs(301);
    let fresh = {
        let creds = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "secret".into(),
            session_token: None,
        };
        let signed_url = reqwest::Url::parse(&url).expect("url");
        SignedRequest::sign(&signed_url, "us-east-1", SERVER_ID, &creds, later).encode()
    };
    verifier.verify(&fresh, later).await.expect("room again");
    assert_eq!(verifier.metrics.remembered.get(), 1);
    let err = verifier.verify(&once, later).await.expect_err("aged out");
    assert_eq!(err.deny_reason(), DenyReason::AwsRequestStale);
}

#[tokio::test]
async fn a_call_given_up_on_leaves_no_slot_or_gauge_behind() {
    let StandIn { url, arrived, .. } = stand_in(Answer::Hang).await;
    let verifier = AwsVerifier::new(&config(&url, 1)).expect("verifier");
    let signed = token(&url);
    {
        let call = verifier.verify(&signed, SystemTime::now());
        tokio::pin!(call);
        tokio::select! {
            _ = &mut call => panic!("a hanging STS cannot answer"),
            () = arrived.notified() => {}
        }
        assert_eq!(verifier.metrics.in_flight.get(), 1);
        // `call` is dropped here, as a shed connection's admission is.
    }
    assert_eq!(verifier.metrics.in_flight.get(), 0);
    assert!(verifier.slots.try_acquire().is_ok(), "the slot came back");
}
