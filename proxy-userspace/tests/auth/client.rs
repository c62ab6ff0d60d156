//! Client helpers against a fake agent and a fake grant API on loopback.

use std::time::Duration;

use serde_json::{Value, json};
use tcpgate::auth::client::{ClientError, connect_with_preamble, request_grant};
use tcpgate::auth::preamble::{MAX_TOKEN_LEN, Status, encode_response, read_preamble};
use tcpgate::auth::{Destination, DestinationSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;
use crate::test_server::TestServer;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts one connection, reads the preamble, answers `status`, then
/// echoes what follows when allowed.
async fn fake_agent(
    status: Status,
    message: &'static str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let p = read_preamble(&mut s, TIMEOUT, MAX_TOKEN_LEN)
            .await
            .expect("preamble");
        s.write_all(&encode_response(status, message))
            .await
            .expect("answer");
        if status == Status::Ok {
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.expect("payload");
            s.write_all(&buf).await.expect("echo");
        }
        p.token
    });
    (addr, task)
}

#[tokio::test]
async fn allowed_connection_carries_the_client_protocol_after_the_answer() {
    let (addr, agent) = fake_agent(Status::Ok, "").await;
    let mut stream = connect_with_preamble(addr, TOKEN, TIMEOUT)
        .await
        .expect("allowed");
    stream.write_all(b"ping").await.expect("write");
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.expect("echo");
    assert_eq!(&echo, b"ping");
    assert_eq!(agent.await.expect("agent"), TOKEN);
}

#[tokio::test]
async fn denial_carries_the_agents_message() {
    let (addr, agent) = fake_agent(Status::Denied, "token expired").await;
    match connect_with_preamble(addr, TOKEN, TIMEOUT).await {
        Err(ClientError::Denied { message }) => assert_eq!(message, "token expired"),
        other => panic!("expected a denial, got {other:?}"),
    }
    agent.await.expect("agent");
    let (addr, _agent) = fake_agent(Status::Error, "upstream unreachable").await;
    let e = connect_with_preamble(addr, TOKEN, TIMEOUT)
        .await
        .expect_err("error");
    assert_eq!(e.to_string(), "the agent failed: upstream unreachable");
}

#[tokio::test]
async fn a_peer_that_is_not_an_agent_is_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    });
    let e = connect_with_preamble(addr, TOKEN, TIMEOUT)
        .await
        .expect_err("error");
    assert!(matches!(e, ClientError::Answer { .. }), "{e:?}");
}

#[tokio::test]
async fn grant_request_sends_bearer_and_body_and_parses_the_answer() {
    let answer = json!({
        "grant_id": "00000000deadbeef", "expires_at": "2030-01-02T03:04:05Z", "source": "198.51.100.20",
        "destinations": [{"prefix": "192.0.2.10/32", "ports": ["5432"]}],
        "subject": "project_path:group/app:ref_type:branch:ref:main", "rule": "deploy-db"
    });
    let server = TestServer::start(false, 200, &answer.to_string()).await;
    let dest = Destination::parse(&DestinationSpec {
        prefix: "192.0.2.10".into(),
        ports: vec!["5432".into()],
    })
    .expect("destination");
    let api = format!("http://{}/", server.addr);
    let g = request_grant(
        &api,
        TOKEN,
        Some(std::slice::from_ref(&dest)),
        Some(Duration::from_secs(600)),
        None,
    )
    .await
    .expect("grant");
    assert_eq!(
        (g.grant_id.as_str(), g.rule.as_str()),
        ("00000000deadbeef", "deploy-db")
    );
    assert_eq!(g.destinations, vec![dest]);
    assert_eq!(
        humantime::format_rfc3339(g.expires_at).to_string(),
        "2030-01-02T03:04:05Z"
    );
    let seen = server.seen.lock().expect("seen")[0].clone();
    assert!(
        seen.head.starts_with("POST /v1/grants HTTP/1.1"),
        "{}",
        seen.head
    );
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {TOKEN}"))
    );
    let body: Value = serde_json::from_slice(&seen.body).expect("json body");
    assert_eq!(
        body,
        json!({"destinations": [{"prefix": "192.0.2.10/32", "ports": ["5432"]}], "lifetime": "10m"})
    );
}

#[tokio::test]
async fn grant_api_errors_are_mapped() {
    let server = TestServer::start(
        false,
        403,
        r#"{"error":"no_rule_matched","message":"no policy rule matches this token"}"#,
    )
    .await;
    let api = format!("http://{}", server.addr);
    let e = request_grant(&api, TOKEN, None, None, None)
        .await
        .expect_err("denied");
    assert_eq!(e.reason(), Some("no_rule_matched"));
    assert!(matches!(e, ClientError::Api { status: 403, .. }), "{e:?}");
    let body: Value =
        serde_json::from_slice(&server.seen.lock().expect("seen")[0].body).expect("json");
    assert_eq!(body, json!({}), "no optional fields sent");
    server.set_reply(502, "<html>bad gateway</html>");
    let e = request_grant(&api, TOKEN, None, None, None)
        .await
        .expect_err("bad gateway");
    assert!(
        matches!(e, ClientError::UnexpectedBody { status: 502, .. }),
        "{e:?}"
    );
    let e = request_grant("ftp://x", TOKEN, None, None, None)
        .await
        .expect_err("bad url");
    assert!(matches!(e, ClientError::BadUrl { .. }));
}

#[tokio::test]
async fn grant_api_over_https_with_a_private_ca() {
    let answer = json!({
        "grant_id": "1", "expires_at": "2030-01-02T03:04:05Z", "source": "127.0.0.1",
        "destinations": [], "subject": "s", "rule": "r"
    });
    let server = TestServer::start(true, 200, &answer.to_string()).await;
    let api = format!("https://127.0.0.1:{}", server.addr.port());
    let ca = key_files().ca_pem.clone();
    assert!(
        request_grant(&api, TOKEN, None, None, Some(&ca))
            .await
            .is_ok()
    );
    let e = request_grant(&api, TOKEN, None, None, None)
        .await
        .expect_err("untrusted");
    assert!(
        matches!(
            &e,
            ClientError::Untrusted {
                problem: tokio_rustls::rustls::CertificateError::UnknownIssuer,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("the system trust store does not vouch for"),
        "{e}"
    );
}

mod token_source {
    use std::collections::HashMap;
    use std::path::Path;

    use tcpgate::auth::client::{ClientError, TokenSource};

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    const GITLAB: [(&str, &str); 2] = [("CI", "true"), ("GITLAB_CI", "true")];

    #[test]
    fn token_env_reads_the_named_variable() {
        let source = TokenSource::choose(None, Some("MY_JWT"), env(&[])).expect("chosen");
        assert_eq!(source, TokenSource::Env("MY_JWT".into()));
        let token = source
            .read_with(env(&[("MY_JWT", &format!(" {JWT}\n"))]))
            .expect("read");
        assert_eq!(token, JWT);
        let unset = source.read_with(env(&[])).expect_err("unset");
        assert!(matches!(unset, ClientError::EnvUnset { ref name } if name == "MY_JWT"));
        let junk = source
            .read_with(env(&[("MY_JWT", "hello")]))
            .expect_err("junk");
        assert!(matches!(junk, ClientError::EnvNotAJwt { .. }), "{junk}");
    }

    #[test]
    fn a_gitlab_job_reads_tcpgate_token_by_default_and_names_the_missing_yaml() {
        let source = TokenSource::choose(None, None, env(&GITLAB)).expect("gitlab default");
        assert_eq!(source, TokenSource::GitlabDefault);
        let mut vars = GITLAB.to_vec();
        vars.push(("TCPGATE_TOKEN", JWT));
        assert_eq!(source.read_with(env(&vars)).expect("read"), JWT);
        let missing = source.read_with(env(&GITLAB)).expect_err("missing");
        assert_eq!(
            missing.to_string(),
            "no token: TCPGATE_TOKEN is not set in this GitLab job; add to the job:\n  \
             id_tokens:\n    TCPGATE_TOKEN:\n      aud: <audience>\n\
             (the audience the bastion's [[auth.issuer]] expects)"
        );
        // An explicit option wins over the default.
        let file = TokenSource::choose(Some(Path::new("/t.jwt")), None, env(&GITLAB));
        assert_eq!(file.expect("file"), TokenSource::File("/t.jwt".into()));
        // Only both GitLab variables make a GitLab job.
        for vars in [&[("CI", "true")][..], &[("GITLAB_CI", "true")], &[]] {
            let err = TokenSource::choose(None, None, env(vars)).expect_err("no default");
            assert!(matches!(err, ClientError::NoToken), "{vars:?}");
            assert!(TokenSource::is_usage_error(&err));
        }
    }
}
