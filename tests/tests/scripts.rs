//! The operator's scripts in scripts/, run as an operator or a CI job would:
//! `tcpgate-grant.sh` from the runner with a GitLab-style token, and
//! `tcpgate-maps.sh` on a live agent's pin directory, and
//! `tcpgate-api-cert.sh` making the certificate an agent then serves.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, echo_service, policy};
use tcpgate_tests::require_root;
use tcpgate_tests::tls::ApiCert;
use tcpgate_tests::topology::{BASTION_RUNNER_V4, BASTION_RUNNER_V6};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Sends `hello` and returns what came back before EOF or the timeout.
fn echo(fx: &AuthFixture) -> Result<(u16, Vec<u8>)> {
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let port = stream.local_addr()?.port();
    stream.write_all(b"hello")?;
    let mut got = vec![0u8; 5];
    match stream.read_exact(&mut got) {
        Ok(()) => Ok((port, got)),
        Err(_) => Ok((port, Vec::new())),
    }
}

/// Runs tcpgate-grant.sh on the runner with only the token source that
/// `token_env` sets (none when empty).
fn grant_script(fx: &AuthFixture, token_env: &[(&str, &str)]) -> Result<Output> {
    let target = AuthFixture::target(9000);
    let mut command = fx.topo.runner.command("sh");
    command
        .arg(script("tcpgate-grant.sh"))
        .env("TCPGATE_BIN", fx.agent.binary())
        .env("TCPGATE_API", AuthFixture::api_url())
        .env("TCPGATE_CA", &fx.api_ca)
        .env(
            "TCPGATE_ALLOW",
            format!("{}={}", target.ip(), target.port()),
        )
        .env("TCPGATE_LIFETIME", "5m");
    for source in [
        "TCPGATE_TOKEN",
        "TCPGATE_TOKEN_FILE",
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    ] {
        command.env_remove(source);
    }
    command.envs(token_env.iter().copied());
    command.output().context("run tcpgate-grant.sh")
}

#[test]
fn grant_script_with_a_gitlab_token_admits_a_plain_client() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = echo_service(&fx, b"")?;
    // No grant yet: refused, so the script is what admits the client.
    ensure!(echo(&fx)?.1.is_empty(), "admitted without a grant");

    let token = fx.token();
    let output = grant_script(&fx, &[("TCPGATE_TOKEN", &token)])?;
    let (stdout, stderr) = text(&output);
    ensure!(
        output.status.success(),
        "tcpgate-grant.sh: {stdout} {stderr}"
    );
    ensure!(
        !stdout.contains(&token) && !stderr.contains(&token),
        "the script printed the token"
    );
    ensure!(
        echo(&fx)?.1 == b"hello",
        "plain client not admitted: {stdout}"
    );

    // Without any token it names the variables to set and grants nothing.
    let output = grant_script(&fx, &[])?;
    let (_, stderr) = text(&output);
    ensure!(
        !output.status.success() && stderr.contains("no token"),
        "without a token: {stderr}"
    );
    server.stop()?;
    Ok(())
}

/// GitHub's OIDC endpoint: answers one request with `token` as its
/// `value` and returns the request head it got.
fn github_oidc(fx: &AuthFixture, token: String) -> Result<tcpgate_tests::AcceptLoop<String>> {
    Ok(tcpgate_tests::accept_loop(
        &fx.topo.runner,
        "127.0.0.1:0".parse()?,
        1,
        move |mut stream, _| {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).is_ok() {
                head.push(byte[0]);
            }
            let body = format!("{{\"count\":1,\"value\":\"{token}\"}}");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            String::from_utf8_lossy(&head).into_owned()
        },
    )?)
}

#[test]
fn grant_script_fetches_the_github_oidc_token_for_audience_tcpgate() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = echo_service(&fx, b"")?;
    let oidc = github_oidc(&fx, fx.token())?;
    let url = format!("http://{}/token?api-version=2.0", oidc.local_addr());
    let output = grant_script(
        &fx,
        &[
            ("ACTIONS_ID_TOKEN_REQUEST_URL", &url),
            ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "request-secret"),
        ],
    )?;
    ensure!(output.status.success(), "GitHub mode: {:?}", text(&output));
    let heads = oidc.stop()?;
    ensure!(
        heads.len() == 1
            && heads[0].starts_with("GET /token?api-version=2.0&audience=tcpgate ")
            && heads[0].contains("Authorization: Bearer request-secret\r\n"),
        "the OIDC request: {heads:?}"
    );
    ensure!(echo(&fx)?.1 == b"hello", "plain client not admitted");
    server.stop()?;
    Ok(())
}

#[test]
fn maps_script_lists_the_live_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let server = echo_service(&fx, b"")?;
    fx.grant_from_runner(&fx.token(), &[])?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    stream.write_all(b"hello")?;
    let mut got = [0u8; 5];
    stream.read_exact(&mut got)?;
    let port = stream.local_addr()?.port();

    let run = |args: &[&str], path: Option<&Path>| -> Result<Output> {
        let mut command = Command::new("/bin/sh");
        command.arg(script("tcpgate-maps.sh")).args(args);
        if let Some(path) = path {
            command.env("PATH", path);
        }
        Ok(command.output()?)
    };
    let pin = fx.agent.pin_dir().to_str().context("utf-8")?;
    let output = run(&["-d", pin, "-j", "sessions"], None)?;
    let (stdout, stderr) = text(&output);
    ensure!(output.status.success(), "tcpgate-maps.sh: {stderr}");
    let entries: Vec<Value> = serde_json::from_str(&stdout).context("bpftool JSON")?;
    ensure!(
        entries.len() == 1 && entries[0]["formatted"]["value"]["client_port"] == port,
        "the session of port {port}: {stdout}"
    );
    // The plain dump names each map it prints.
    let output = run(&["-d", pin], None)?;
    let (stdout, stderr) = text(&output);
    ensure!(
        output.status.success()
            && ["sessions", "sockets", "grants", "intercept", "stats"]
                .iter()
                .all(|map| stdout.contains(&format!("== {map} "))),
        "all maps: {stdout} {stderr}"
    );

    // Clear errors: a wrong pin dir, an unknown map, no bpftool.
    let missing = fx.agent.dir().join("no-such-pins");
    let missing = missing.to_str().context("utf-8")?;
    let output = run(&["-d", missing], None)?;
    ensure!(
        output.status.code() == Some(1) && text(&output).1.contains(missing),
        "missing pins: {:?}",
        text(&output)
    );
    let output = run(&["-d", pin, "sesions"], None)?;
    ensure!(
        output.status.code() == Some(64) && text(&output).1.contains("unknown map sesions"),
        "unknown map: {:?}",
        text(&output)
    );
    let empty = tempfile::tempdir()?;
    let output = run(&["-d", pin], Some(empty.path()))?;
    ensure!(
        output.status.code() == Some(1) && text(&output).1.contains("bpftool not found"),
        "no bpftool: {:?}",
        text(&output)
    );
    drop(stream);
    server.stop()?;
    Ok(())
}

#[test]
fn api_cert_script_makes_a_certificate_runners_trust_and_renews_the_leaf() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let etc = tempfile::tempdir()?;
    let make = || -> Result<Output> {
        let dir = etc.path().to_str().context("utf-8")?;
        let (v4, v6) = (BASTION_RUNNER_V4.to_string(), BASTION_RUNNER_V6.to_string());
        let args = ["-d", dir, "-g", "root", &v4, &v6, "bastion.example"];
        Ok(Command::new("sh")
            .arg(script("tcpgate-api-cert.sh"))
            .args(args)
            .output()?)
    };
    let output = make()?;
    ensure!(output.status.success(), "first run: {:?}", text(&output));
    let read = |name: &str| std::fs::read(etc.path().join(name));
    let (ca, leaf) = (read("bastion-ca.pem")?, read("api.pem")?);
    // A renewal keeps the CA runners hold and issues a new leaf.
    let output = make()?;
    ensure!(output.status.success(), "renewal: {:?}", text(&output));
    ensure!(read("bastion-ca.pem")? == ca, "the renewal replaced the CA");
    ensure!(read("api.pem")? != leaf, "the renewal kept the old leaf");

    let fx = AuthFixture::start_launched(
        &policy("15m"),
        &[],
        Launch {
            api_cert: Some(ApiCert {
                cert: etc.path().join("api.pem"),
                key: etc.path().join("api.key"),
                trust: etc.path().join("bastion-ca.pem"),
            }),
            ..Launch::default()
        },
    )?;
    let server = echo_service(&fx, b"")?;
    let output = grant_script(&fx, &[("TCPGATE_TOKEN", &fx.token())])?;
    ensure!(
        output.status.success(),
        "grant against the script's certificate: {:?}",
        text(&output)
    );
    ensure!(echo(&fx)?.1 == b"hello", "plain client not admitted");
    server.stop()?;
    Ok(())
}
