//! AWS IAM identities end to end, against moto's STS: a runner proves its
//! role with a signed `GetCallerIdentity` (`tcpgate connect --aws`,
//! `tcpgate grant --aws`), the bastion asks STS who signed it and admits by
//! account, role and session name. From the attacker's side: another
//! account, a request signed for another bastion, used twice or too long
//! ago, and STS down, each denied with its reason and without an upstream
//! connection.

use std::io::{Read, Write};
use std::process::Output;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, authenticate, echo_service, policy};
use tcpgate_tests::metrics::{parse, scrape_unix};
use tcpgate_tests::moto::{Moto, SessionCredentials};
use tcpgate_tests::{Payload, Topology, require_root, serve_once, wait_events};

const SERVER_ID: &str = "bastion-test-1";
const ACCOUNT: &str = "123456789012";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/ci-deploy";
const SUBJECT: &str = "arn:aws:sts::123456789012:assumed-role/ci-deploy/job-42";

/// moto first in the struct: it stops before the topology goes.
struct AwsFixture {
    moto: Moto,
    fx: AuthFixture,
}

/// The rule: role `ci-deploy` of account 123456789012, job sessions only.
fn aws_policy() -> String {
    format!(
        "{}\n[[policy]]\nname = \"aws-deploy\"\nissuer = \"aws\"\nmax_lifetime = \"10m\"\n\
         match = {{ \"aws.account\" = \"{ACCOUNT}\", \"aws.role\" = \"ci-deploy\", \"aws.session\" = \"job-*\" }}\n\
         allow = [ {{ prefix = \"192.0.2.10/32\", ports = [\"5432\", \"9000\"] }} ]\n",
        policy("15m")
    )
}

fn start() -> Result<AwsFixture> {
    let topo = Topology::new()?;
    let moto = Moto::start(&topo.bastion)?;
    let sections = format!(
        "[auth.aws]\nsts_endpoint = {:?}\nserver_id = {SERVER_ID:?}\nmax_age = \"5m\"\n\
         sts_timeout = \"3s\"\nmax_concurrent = 4\n",
        moto.url()
    );
    let launch = Launch {
        topology: Some(topo),
        sections,
        ..Launch::default()
    };
    let fx = AuthFixture::start_launched(&aws_policy(), &[], launch)?;
    Ok(AwsFixture { moto, fx })
}

impl AwsFixture {
    fn assume(&self, role_arn: &str, session: &str) -> Result<SessionCredentials> {
        Ok(self
            .moto
            .assume_role(&self.fx.topo.bastion, role_arn, session)?)
    }

    /// Runs `tcpgate ARGS` in the runner with `creds` in the environment
    /// and `input` on stdin.
    /// `tcpgate grant --aws` for this bastion's server id, through the API.
    fn grant_aws(&self, creds: &SessionCredentials, extra: &[&str]) -> Result<Output> {
        let api = AuthFixture::api_url();
        let ca = self.fx.api_ca.to_str().context("utf-8 path")?;
        let mut args = vec![
            "grant",
            "--aws",
            "--aws-server-id",
            SERVER_ID,
            "--api",
            &api,
            "--ca",
            ca,
        ];
        args.extend_from_slice(extra);
        self.cli_as(creds, &args, b"")
    }

    fn cli_as(&self, creds: &SessionCredentials, args: &[&str], input: &[u8]) -> Result<Output> {
        let mut command = self.fx.topo.runner.command(self.fx.agent.binary());
        command
            .args(args)
            .envs(creds.env())
            .env("TCPGATE_AWS_STS_ENDPOINT", self.moto.url())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().context("spawn tcpgate")?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let output = child.wait_with_output()?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("stdin writer panicked"))??;
        Ok(output)
    }

    fn connect_aws(
        &self,
        creds: &SessionCredentials,
        server_id: &str,
        input: &[u8],
    ) -> Result<Output> {
        self.cli_as(
            creds,
            &[
                "connect",
                "--aws",
                "--aws-server-id",
                server_id,
                "192.0.2.10:9000",
            ],
            input,
        )
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let text = scrape_unix(&self.fx.admin_socket())?;
        Ok(parse(&text)?.count(name, labels))
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn aws_role_admits_through_connect_and_grant_byte_exact() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let a = start()?;
    let server = echo_service(&a.fx, b"")?;
    let creds = a.assume(ROLE_ARN, "job-42")?;

    // psql-like: the client speaks first; 256 KiB through `connect --aws`.
    let payload = Payload::new(16, 256 * 1024).to_vec();
    let output = a.connect_aws(&creds, SERVER_ID, &payload)?;
    ensure!(
        output.status.success(),
        "connect --aws: {}",
        stderr(&output)
    );
    ensure!(
        output.stdout == payload,
        "byte-exact echo: {} bytes back of {} (a leaked token would show up first)",
        output.stdout.len(),
        payload.len()
    );
    let closed = &wait_events(&a.fx.agent, "session_close", 1)?[0];
    let up = |f: &str| closed[f].as_u64().unwrap_or(0);
    ensure!(
        closed["subject"] == SUBJECT
            && up("bytes_up") == payload.len() as u64
            && up("kernel_bytes_up") > 0
            && up("kernel_bytes_up") + up("userspace_bytes_up") == payload.len() as u64,
        "spliced through the kernel for the role session: {closed}"
    );

    // The grant API: a grant bound to the runner, then a plain client.
    let output = a.grant_aws(&creds, &["--json"])?;
    ensure!(output.status.success(), "grant --aws: {}", stderr(&output));
    let grant: Value = serde_json::from_slice(&output.stdout)?;
    ensure!(
        grant["subject"] == SUBJECT && grant["rule"] == "aws-deploy",
        "{grant}"
    );
    let mut stream = a.fx.dial_from_runner(AuthFixture::target(9000))?;
    let chunk = Payload::new(17, 64 * 1024).to_vec();
    stream.write_all(&chunk)?;
    let mut back = vec![0u8; chunk.len()];
    stream.read_exact(&mut back)?;
    ensure!(back == chunk, "byte-exact through the source grant");
    drop(stream);
    ensure!(
        a.metric("tcpgate_aws_sts_calls_total", &[("result", "ok")])? == 2.0,
        "two STS calls answered"
    );
    server.stop()?;
    Ok(())
}

#[test]
fn aws_wrong_account_is_denied_without_an_upstream_connection() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let a = start()?;
    let server = echo_service(&a.fx, b"")?;
    let creds = a.assume("arn:aws:iam::111122223333:role/ci-deploy", "job-42")?;
    let output = a.connect_aws(&creds, SERVER_ID, b"SELECT 1;")?;
    ensure!(
        output.status.code() == Some(77),
        "exit: {:?} {}",
        output.status,
        stderr(&output)
    );
    ensure!(
        stderr(&output).contains("access denied (no_rule_matched)"),
        "{}",
        stderr(&output)
    );
    let denied = &wait_events(&a.fx.agent, "connection_denied", 1)?[0];
    ensure!(
        denied["reason"] == "auth_failed"
            && denied["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("no_rule_matched:")
            && denied["subject"] == "arn:aws:sts::111122223333:assumed-role/ci-deploy/job-42",
        "{denied}"
    );
    ensure!(server.stop()?.is_empty(), "the upstream saw a connection");
    Ok(())
}

/// Captures the token `tcpgate connect --aws` sends, at a listener of our
/// own in the runner, and answers it `denied`.
fn capture_token(a: &AwsFixture, creds: &SessionCredentials, server_id: &str) -> Result<String> {
    let catcher = serve_once(
        &a.fx.topo.runner,
        "127.0.0.1:0".parse()?,
        |mut stream, _| {
            let mut header = [0u8; 8];
            stream.read_exact(&mut header)?;
            let mut token = vec![0u8; usize::from(u16::from_be_bytes([header[6], header[7]]))];
            stream.read_exact(&mut token)?;
            stream.write_all(b"TCPG\x01\x01\x00\x00")?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&token).into_owned())
        },
    )?;
    let target = catcher.local_addr().to_string();
    let output = a.cli_as(
        creds,
        &["connect", "--aws", "--aws-server-id", server_id, &target],
        b"",
    )?;
    ensure!(
        output.status.code() == Some(77),
        "the catcher denies: {}",
        stderr(&output)
    );
    Ok(catcher.join()??)
}

/// The request as if signed at `amz_date`: its `X-Amz-Date` and the date
/// of its credential scope (the bastion checks both before STS).
fn dated(token: &str, amz_date: &str) -> Result<String> {
    let body = token.strip_prefix("aws-sts.").context("aws token")?;
    let mut request: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body)?)?;
    let headers = &mut request["headers"];
    let day = headers["X-Amz-Date"].as_str().context("X-Amz-Date")?[..8].to_owned();
    let authz = headers["Authorization"].as_str().context("Authorization")?;
    let authz = authz.replace(&format!("/{day}/"), &format!("/{}/", &amz_date[..8]));
    headers["Authorization"] = Value::from(authz);
    headers["X-Amz-Date"] = Value::from(amz_date);
    Ok(format!(
        "aws-sts.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&request)?)
    ))
}

#[test]
fn aws_replays_for_another_bastion_twice_or_too_old_are_denied() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let a = start()?;
    let server = echo_service(&a.fx, b"")?;
    let creds = a.assume(ROLE_ARN, "job-42")?;

    // A request a runner signed for another bastion, replayed here.
    let elsewhere = capture_token(&a, &creds, "bastion-other")?;
    let mut stream = a.fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &elsewhere)?;
    ensure!(
        status == 1 && message == "access denied (aws_wrong_server_id)",
        "{status} {message}"
    );
    // The same through the grant API.
    let api = AuthFixture::api_url();
    let ca = a.fx.api_ca.to_str().context("utf-8 path")?;
    let output =
        a.fx.topo
            .runner
            .command("curl")
            .args(["-sS", "--cacert", ca, "-X", "POST", "-H"])
            .arg(format!("Authorization: Bearer {elsewhere}"))
            .arg(format!("{api}/v1/grants"))
            .output()?;
    let body = String::from_utf8_lossy(&output.stdout);
    ensure!(
        body.contains("\"aws_wrong_server_id\""),
        "grant API: {body}"
    );

    // A request for this bastion: good once, then refused, even at once.
    let fresh = capture_token(&a, &creds, SERVER_ID)?;
    let mut stream = a.fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &fresh)?;
    ensure!(status == 0, "the first use admits: {message}");
    drop(stream);
    let mut stream = a.fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &fresh)?;
    ensure!(
        status == 1 && message == "access denied (aws_request_replayed)",
        "{status} {message}"
    );
    // And replayed after the 5 minute window.
    let old = dated(&fresh, "20200101T000000Z")?;
    let mut stream = a.fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &old)?;
    ensure!(
        status == 1 && message == "access denied (aws_request_stale)",
        "{status} {message}"
    );

    let denied = wait_events(&a.fx.agent, "connection_denied", 3)?;
    let detail = |i: usize| denied[i]["detail"].as_str().unwrap_or("").to_owned();
    ensure!(
        detail(0).starts_with("aws_wrong_server_id:")
            && detail(1).starts_with("aws_request_replayed:")
            && detail(2).starts_with("aws_request_stale:"),
        "{denied:?}"
    );
    // Refused by the bastion's own checks: STS was asked once, for the
    // first use.
    ensure!(
        a.metric("tcpgate_aws_sts_calls_total", &[("result", "not_sent")])? == 4.0
            && a.metric("tcpgate_aws_sts_calls_total", &[("result", "ok")])? == 1.0,
        "metrics"
    );
    ensure!(
        server.stop()?.len() == 1,
        "the upstream saw the first use only"
    );
    Ok(())
}

#[test]
fn aws_sts_down_is_a_clear_denial_never_an_admission() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut a = start()?;
    let server = echo_service(&a.fx, b"")?;
    let creds = a.assume(ROLE_ARN, "job-42")?;
    a.moto.stop();
    let output = a.connect_aws(&creds, SERVER_ID, b"SELECT 1;")?;
    ensure!(
        output.status.code() == Some(77),
        "exit: {:?} {}",
        output.status,
        stderr(&output)
    );
    ensure!(
        stderr(&output).contains("access denied (sts_unavailable)"),
        "{}",
        stderr(&output)
    );
    let denied = &wait_events(&a.fx.agent, "connection_denied", 1)?[0];
    let detail = denied["detail"].as_str().unwrap_or("");
    ensure!(
        denied["reason"] == "auth_failed"
            && detail.starts_with("sts_unavailable:")
            && detail.contains("unreachable"),
        "{denied}"
    );
    let output = a.grant_aws(&creds, &[])?;
    ensure!(
        output.status.code() == Some(77) && stderr(&output).contains("sts_unavailable"),
        "grant: {:?} {}",
        output.status,
        stderr(&output)
    );
    ensure!(
        a.metric("tcpgate_aws_sts_calls_total", &[("result", "unreachable")])? == 2.0
            && a.metric("tcpgate_aws_sts_in_flight", &[])? == 0.0,
        "metrics"
    );
    ensure!(server.stop()?.is_empty(), "the upstream saw a connection");
    Ok(())
}
