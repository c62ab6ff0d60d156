//! The bastion's checks on a signed request, from the attacker's side:
//! requests signed for another bastion, replayed late, with the server id
//! unsigned, or asking STS for something else.

use super::*;

const SERVER: &str = "bastion-eu-1";
const WINDOW: Duration = Duration::from_secs(300);

fn creds() -> Credentials {
    Credentials {
        access_key_id: "ASIAEXAMPLE".into(),
        secret_access_key: "secret".into(),
        session_token: Some("session-token".into()),
    }
}

fn now() -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(1_790_000_000)
}

fn signed_for(server_id: &str, at: SystemTime) -> SignedRequest {
    let url = reqwest::Url::parse("https://sts.eu-west-1.amazonaws.com/").expect("url");
    SignedRequest::sign(&url, "eu-west-1", server_id, &creds(), at)
}

fn expect() -> Expect<'static> {
    Expect {
        server_id: SERVER,
        host: "sts.eu-west-1.amazonaws.com",
        max_age: WINDOW,
        region: None,
    }
}

#[test]
fn a_fresh_request_for_this_bastion_passes_and_round_trips() {
    let req = signed_for(SERVER, now());
    assert!(req.check(&expect(), now()).is_ok());
    let token = req.encode();
    assert!(token.starts_with(TOKEN_PREFIX));
    // Never mistaken for a JWT (three dot-separated parts).
    assert_eq!(token.split('.').count(), 2);
    assert_eq!(SignedRequest::decode(&token), Ok(req.clone()));
    let authz = &req.headers["Authorization"];
    assert!(
        authz.contains("/eu-west-1/sts/aws4_request")
            && authz.contains(
                "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-tcpgate-nonce;x-tcpgate-server-id,"
            ),
        "{authz}"
    );
    assert_eq!(req.headers["Host"], "sts.eu-west-1.amazonaws.com");
    // Signed in the same second, two requests still differ.
    let again = signed_for(SERVER, now());
    assert_ne!(
        req.check(&expect(), now()).map(|c| c.signature),
        again.check(&expect(), now()).map(|c| c.signature)
    );
}

#[test]
fn a_request_signed_for_another_bastion_is_refused() {
    let req = signed_for("bastion-us-1", now());
    assert_eq!(
        req.check(&expect(), now()),
        Err(RequestError::WrongServerId {
            given: "bastion-us-1".into(),
            expected: SERVER.into()
        })
    );
    // Editing the header afterwards does not help: STS would refuse the
    // signature, and an unsigned or missing header is refused here.
    let mut unsigned = signed_for(SERVER, now());
    let authz = unsigned.headers["Authorization"].replace(";x-tcpgate-server-id", "");
    unsigned.headers.insert("Authorization".into(), authz);
    assert_eq!(
        unsigned.check(&expect(), now()),
        Err(RequestError::Unsigned(SERVER_ID_HEADER))
    );
    let mut missing = signed_for(SERVER, now());
    missing.headers.remove(SERVER_ID_HEADER);
    assert_eq!(
        missing.check(&expect(), now()),
        Err(RequestError::MissingHeader(SERVER_ID_HEADER))
    );
    let mut twice = signed_for(SERVER, now());
    twice
        .headers
        .insert("x-tcpgate-server-id".into(), "bastion-us-1".into());
    assert!(matches!(
        twice.check(&expect(), now()),
        Err(RequestError::DuplicateHeader(_))
    ));
}

#[test]
fn old_and_future_requests_are_refused_outside_the_window() {
    let old = signed_for(SERVER, now() - WINDOW - Duration::from_secs(1));
    assert!(matches!(
        old.check(&expect(), now()),
        Err(RequestError::Stale { .. })
    ));
    let edge = signed_for(SERVER, now() - WINDOW);
    assert!(edge.check(&expect(), now()).is_ok());
    let ahead = signed_for(SERVER, now() + WINDOW + Duration::from_secs(1));
    let err = ahead.check(&expect(), now()).expect_err("ahead");
    assert!(err.to_string().contains("ahead"), "{err}");
    let mut garbled = signed_for(SERVER, now());
    garbled
        .headers
        .insert("X-Amz-Date".into(), "yesterday".into());
    assert!(matches!(
        garbled.check(&expect(), now()),
        Err(RequestError::BadDate(_))
    ));
}

#[test]
fn only_get_caller_identity_is_forwarded() {
    for (method, body) in [
        ("GET", BODY),
        ("POST", "Action=AssumeRole&Version=2011-06-15&RoleArn=x"),
        (
            "POST",
            "Action=GetCallerIdentity&Version=2011-06-15&Extra=1",
        ),
        ("POST", ""),
    ] {
        let mut req = signed_for(SERVER, now());
        req.method = method.into();
        req.body = body.into();
        assert!(
            matches!(
                req.check(&expect(), now()),
                Err(RequestError::NotGetCallerIdentity(_))
            ),
            "{method} {body}"
        );
    }
    let mut reordered = signed_for(SERVER, now());
    reordered.body = "Version=2011-06-15&Action=GetCallerIdentity".into();
    assert!(reordered.check(&expect(), now()).is_ok());
}

#[test]
fn authorization_must_be_sigv4_for_sts_in_the_region() {
    let mut other_service = signed_for(SERVER, now());
    let authz = other_service.headers["Authorization"].replace("/sts/", "/s3/");
    other_service.headers.insert("Authorization".into(), authz);
    assert!(matches!(
        other_service.check(&expect(), now()),
        Err(RequestError::BadAuthorization(_))
    ));
    let mut not_sigv4 = signed_for(SERVER, now());
    not_sigv4
        .headers
        .insert("Authorization".into(), "Bearer abc".into());
    assert!(matches!(
        not_sigv4.check(&expect(), now()),
        Err(RequestError::BadAuthorization(_))
    ));
    let pinned = Expect {
        region: Some("us-east-1"),
        ..expect()
    };
    assert!(matches!(
        signed_for(SERVER, now()).check(&pinned, now()),
        Err(RequestError::WrongRegion { .. })
    ));
    let elsewhere = Expect {
        host: "sts.us-east-1.amazonaws.com",
        ..expect()
    };
    assert!(matches!(
        signed_for(SERVER, now()).check(&elsewhere, now()),
        Err(RequestError::WrongHost { .. })
    ));
    let mut injected = signed_for(SERVER, now());
    injected
        .headers
        .insert("X-Evil".into(), "a\r\nHost: evil".into());
    assert!(matches!(
        injected.check(&expect(), now()),
        Err(RequestError::BadHeader(_))
    ));
}

#[test]
fn garbage_tokens_are_refused_with_a_reason() {
    for token in [
        "aws-sts.",
        "aws-sts.!!!",
        "aws-sts.e30",
        "eyJhbGciOiJSUzI1NiJ9.e30.sig",
    ] {
        assert!(
            matches!(SignedRequest::decode(token), Err(RequestError::Encoding(_))),
            "{token}"
        );
    }
}

#[test]
fn mangled_requests_are_refused_never_a_panic() {
    // Every header value cut short or swapped for odd text: an error or a
    // pass, never a panic. Every (signed) header dropped: an error.
    let good = signed_for(SERVER, now());
    let odd = [
        "",
        "é",
        "20261205T06415",
        "AWS4-HMAC-SHA256 ",
        "a=b,c",
        "ü/ü/ü/ü/ü",
    ];
    for name in good.headers.keys() {
        let value = &good.headers[name];
        let cuts = (0..value.len()).filter(|&i| value.is_char_boundary(i));
        let variants: Vec<String> = cuts
            .map(|i| value[..i].to_owned())
            .chain(odd.iter().map(|s| (*s).to_owned()))
            .collect();
        for variant in variants {
            let mut req = good.clone();
            req.headers.insert(name.clone(), variant);
            let _ = req.check(&expect(), now());
        }
        let mut req = good.clone();
        req.headers.remove(name);
        assert!(req.check(&expect(), now()).is_err(), "without {name}");
    }
    let json = serde_json::to_string(&good).expect("json");
    for end in (0..json.len()).filter(|&i| json.is_char_boundary(i)) {
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(&json[..end]));
        assert!(SignedRequest::decode(&token).is_err());
    }
}
