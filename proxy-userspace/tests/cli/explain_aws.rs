//! `tcpgate policy explain --aws`: the shell's AWS identity, signed for the
//! config's `[auth.aws]` and checked by (a stand-in for) its STS, explained
//! rule by rule like a JWT.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread::JoinHandle;

use serde_json::{Value, json};

use crate::support::*;

const RULE: &str = r#"
[[policy]]
name = "aws-deploy"
issuer = "aws"
max_lifetime = "10m"
match = { "aws.account" = "123456789012", "aws.role" = "ci-deploy" }
allow = [ { prefix = "192.0.2.10", ports = ["5432"] } ]
"#;

/// Answers one GetCallerIdentity with `arn`; returns the request it got.
fn sts_once(arn: &'static str) -> (String, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&request).contains("Version=2011-06-15") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let account = arn.split(':').nth(4).unwrap_or_default();
        let body = format!(
            "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>{arn}</Arn>\
             <UserId>AROAEXAMPLE:job-1</UserId><Account>{account}</Account>\
             </GetCallerIdentityResult></GetCallerIdentityResponse>"
        );
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(reply.as_bytes()).expect("reply");
        String::from_utf8_lossy(&request).into_owned()
    });
    (url, handle)
}

fn explain_aws(b: &Bastion) -> (i32, String, String) {
    let mut cmd = tcpgate();
    cmd.args(["policy", "explain", "--config"])
        .arg(&b.config)
        .args(["--aws", "--dest", "192.0.2.10:5432", "--json"])
        .env("AWS_ACCESS_KEY_ID", "ASIAEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_SESSION_TOKEN", "session");
    output(&mut cmd)
}

fn bastion(sts: &str) -> Bastion {
    Bastion::new(&format!(
        "{RULE}\n[auth.aws]\nsts_endpoint = {sts:?}\nserver_id = \"bastion-1\"\nregion = \"eu-west-1\"\n"
    ))
}

#[test]
fn an_allowed_role_is_explained_with_its_aws_claims() {
    let (url, sts) = sts_once("arn:aws:sts::123456789012:assumed-role/ci-deploy/job-1");
    let (status, stdout, stderr) = explain_aws(&bastion(&url));
    assert_eq!(status, 0, "{stdout}{stderr}");
    let r: Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(r["decision"]["rule"], json!("aws-deploy"));
    assert_eq!(r["token"]["claims"]["aws"]["session"], json!("job-1"));
    let request = sts.join().expect("stand-in STS").to_ascii_lowercase();
    // Signed for the bastion's id and required region, with the session.
    assert!(
        request.contains("x-tcpgate-server-id: bastion-1")
            && request.contains("/eu-west-1/sts/aws4_request")
            && request.contains("x-amz-security-token: session"),
        "{request}"
    );
}

#[test]
fn another_account_is_denied_naming_the_claim() {
    let (url, sts) = sts_once("arn:aws:sts::111122223333:assumed-role/ci-deploy/job-1");
    let (status, stdout, _) = explain_aws(&bastion(&url));
    assert_eq!(status, 77, "{stdout}");
    let r: Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(r["decision"]["denial"]["reason"], json!("no_rule_matched"));
    let checks = r["rules"][0]["claims"].as_array().expect("claims");
    let account = checks
        .iter()
        .find(|c| c["claim"] == json!("aws.account"))
        .expect("the account check");
    assert_eq!(account["actual"], json!("111122223333"), "{account}");
    sts.join().expect("stand-in STS");
}

#[test]
fn aws_without_the_section_or_credentials_is_a_usage_error() {
    let b = Bastion::new(
        RULE.replace("\"aws\"", "\"https://gitlab.example.com\"")
            .as_str(),
    );
    let (status, _, stderr) = explain_aws(&b);
    assert_eq!(status, 64, "{stderr}");
    assert!(stderr.contains("no [auth.aws] section"), "{stderr}");
    let b = bastion("http://127.0.0.1:9/");
    let mut cmd = tcpgate();
    cmd.args(["policy", "explain", "--config"])
        .arg(&b.config)
        .arg("--aws")
        .env_remove("AWS_ACCESS_KEY_ID");
    let (status, _, stderr) = output(&mut cmd);
    assert_eq!(status, 64, "{stderr}");
    assert!(stderr.contains("AWS_ACCESS_KEY_ID"), "{stderr}");
}
