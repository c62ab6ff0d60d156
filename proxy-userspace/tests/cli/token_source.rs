//! `tcpgate grant` and `connect` take the token from `--token-env`, and in
//! a GitLab job from TCPGATE_TOKEN; without one they name the missing
//! `id_tokens:` YAML. The servers here only record what the CLI sends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::thread;

use crate::support::*;

/// A one-request HTTP server that answers 403 and returns the request head.
fn grant_api() -> (String, thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let handle = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut head = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            head.push_str(&line);
            line.clear();
        }
        let body = r#"{"error":"no_rule_matched","message":"access denied"}"#;
        let _ = write!(
            stream,
            "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        head
    });
    (url, handle)
}

fn token() -> String {
    TestKey::new("rsa-1", jsonwebtoken::Algorithm::RS256).sign(&gitlab_claims())
}

#[test]
fn grant_sends_the_token_from_token_env_and_from_tcpgate_token_in_gitlab() {
    let jwt = token();
    let (api, server) = grant_api();
    let (status, _, stderr) = output(
        tcpgate()
            .args(["grant", "--api", &api, "--token-env", "JOB_JWT"])
            .env("JOB_JWT", &jwt),
    );
    assert_eq!(status, 77, "the API's 403 is a denial: {stderr}");
    let head = server.join().expect("server");
    assert!(
        head.contains(&format!("authorization: Bearer {jwt}")),
        "{head}"
    );

    let (api, server) = grant_api();
    let (status, _, stderr) = output(
        tcpgate()
            .args(["grant", "--api", &api])
            .env("CI", "true")
            .env("GITLAB_CI", "true")
            .env("TCPGATE_TOKEN", &jwt),
    );
    assert_eq!(status, 77, "{stderr}");
    let head = server.join().expect("server");
    assert!(
        head.contains(&format!("authorization: Bearer {jwt}")),
        "{head}"
    );
}

#[test]
fn connect_sends_the_token_from_tcpgate_token_in_gitlab() {
    let jwt = token();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("addr").to_string();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut seen = Vec::new();
        let _ = stream.read_to_end(&mut seen);
        seen
    });
    let mut cmd = tcpgate();
    cmd.args(["connect", "--timeout", "2s", &target])
        .env("CI", "true")
        .env("GITLAB_CI", "true")
        .env("TCPGATE_TOKEN", &jwt)
        .stdin(std::process::Stdio::null());
    let (status, _, stderr) = output(&mut cmd);
    assert_ne!(status, 0, "no agent answered: {stderr}");
    let seen = server.join().expect("server");
    assert!(
        seen.windows(jwt.len()).any(|w| w == jwt.as_bytes()),
        "the preamble carries TCPGATE_TOKEN"
    );
}

#[test]
fn without_a_token_the_error_names_the_id_tokens_yaml() {
    for verb in [
        &["grant", "--api", "https://127.0.0.1:1"][..],
        &["connect", "127.0.0.1:1"],
    ] {
        let (status, _, stderr) = output(
            tcpgate()
                .args(verb)
                .env("CI", "true")
                .env("GITLAB_CI", "true"),
        );
        assert_eq!(status, 64, "{verb:?}: {stderr}");
        assert!(
            stderr.contains(
                "add to the job:\n  id_tokens:\n    TCPGATE_TOKEN:\n      aud: <audience>"
            ),
            "{verb:?}: {stderr}"
        );
        // Outside GitLab: say which options exist.
        let (status, _, stderr) = output(tcpgate().args(verb));
        assert_eq!(status, 64, "{verb:?}: {stderr}");
        assert!(
            stderr.contains("--token-file FILE or --token-env NAME"),
            "{stderr}"
        );
    }
    let (status, _, stderr) = output(tcpgate().args([
        "grant",
        "--api",
        "https://127.0.0.1:1",
        "--token-env",
        "NOPE",
    ]));
    assert_eq!(status, 64, "{stderr}");
    assert!(
        stderr.contains("environment variable NOPE is not set"),
        "{stderr}"
    );
}
