//! The operator endpoints from the attacker's side: a local user outside
//! the operator group cannot reach the socket (no listing, no revocation);
//! a TCP client without the bearer token, or with a wrong one, gets 401
//! and revokes nothing; the operator can.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, policy};
use tcpgate_tests::metrics::{parse, scrape_unix};
use tcpgate_tests::operator::{self as op, TempGroup, open_session, run, sized_server};
use tcpgate_tests::{Agent, Topology, require_root};

/// A plain HTTP/1.1 request from the bastion; (status code, body).
pub fn request(fx: &AuthFixture, addr: SocketAddr, head: String) -> Result<(u16, String)> {
    let answer = fx.topo.bastion.run(move || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(head.as_bytes())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })?;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no HTTP status: {answer:?}"))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}

fn head(method: &str, path: &str, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!("{method} {path} HTTP/1.1\r\nHost: bastion\r\n{auth}Connection: close\r\n\r\n")
}

const ADMIN_TCP: &str = "127.0.0.1:9470";
const SUBJECT: &str = "project_path:group/app:ref_type:branch:ref:release/1.4";

#[test]
fn tcp_admin_needs_the_bearer_token() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let secrets = tempfile::tempdir()?;
    let token_file = secrets.path().join("admin.token");
    let token = "0123456789abcdef0123456789abcdef-admin";
    std::fs::write(&token_file, format!("{token}\n"))?;
    let launch = Launch {
        admin_extra: format!("listen = \"{ADMIN_TCP}\"\ntoken_file = {token_file:?}\n"),
        ..Launch::default()
    };
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    let server = sized_server(&fx.topo)?;
    let grant = fx.grant_from_runner(&fx.token(), &[])?;
    let mut session = fx.dial_from_runner(AuthFixture::target(9000))?;
    op::exchange(&mut session, 1_000, 2_000)?;
    let addr: SocketAddr = ADMIN_TCP.parse()?;

    // Health probes stay open; they name no grant or subject.
    ensure!(request(&fx, addr, head("GET", "/healthz", None))?.0 == 200);
    let revoke = format!("/v1/grants?subject={}", SUBJECT.replace(':', "%3A"));
    for token in [None, Some("wrong-token-of-the-same-length-0123456789ab")] {
        for (method, path) in [
            ("GET", "/v1/grants"),
            ("GET", "/v1/sessions"),
            ("GET", "/metrics"),
            ("DELETE", revoke.as_str()),
            ("DELETE", &format!("/v1/grants/{grant}")),
        ] {
            let (status, body) = request(&fx, addr, head(method, path, token))?;
            ensure!(
                status == 401,
                "{method} {path} with {token:?}: {status} {body}"
            );
        }
    }
    // The CLI without the token: refused, nothing revoked.
    let cli_admin = format!("http://{ADMIN_TCP}");
    let (status, _, stderr) = fx.cli(
        &fx.topo.bastion,
        &["revoke", "--admin", &cli_admin, "--subject", SUBJECT],
    )?;
    ensure!(
        status == 1 && stderr.contains("401"),
        "revoke without token: {stderr}"
    );
    session.set_read_timeout(Some(Duration::from_secs(1)))?;
    ensure!(
        !op::ended(&mut session),
        "a session ended without a valid revoke"
    );
    session.set_read_timeout(Some(Duration::from_secs(20)))?;
    let listing = fx.cli(
        &fx.topo.bastion,
        &[
            "grants",
            "--json",
            "--admin",
            fx.admin_socket().to_str().context("utf-8")?,
        ],
    )?;
    let doc: Value = serde_json::from_str(&listing.1).with_context(|| listing.1.clone())?;
    ensure!(
        doc["source"] == "api" && doc["grants"][0]["grant_id"] == grant.as_str(),
        "the grant survives: {doc:#}"
    );
    // The operator, with the token file: revoked.
    let file = token_file.to_str().context("utf-8")?;
    let (status, stdout, stderr) = fx.cli(
        &fx.topo.bastion,
        &[
            "revoke",
            "--admin",
            &cli_admin,
            "--admin-token-file",
            file,
            "--subject",
            SUBJECT,
        ],
    )?;
    ensure!(
        status == 0 && stdout.contains("revoked grant"),
        "{stdout} {stderr}"
    );
    ensure!(
        op::ended(&mut session),
        "the operator's revoke ended the session"
    );
    let metrics = parse(&scrape_unix(&fx.admin_socket())?)?;
    let refused = metrics.count(
        "tcpgate_http_limit_hits_total",
        &[("server", "admin"), ("limit", "unauthorized")],
    );
    ensure!(refused >= 11.0, "401s counted: {refused}");
    server.stop()?;
    Ok(())
}

/// An operator-fixture agent (no tokens) whose socket belongs to `group`.
fn agent_with_group(topo: &Topology, group: &TempGroup) -> Result<Agent> {
    let builder = Agent::builder(&topo.bastion)?;
    let config = op::config(&builder, &format!("operator_group = {:?}", group.name));
    let agent = builder.config(config).spawn()?;
    // Let everyone traverse to the socket: its own mode is what is tested.
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o711))?;
    Ok(agent)
}

#[test]
fn operator_socket_admits_only_the_operator_group() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let group = TempGroup::new()?;
    let topo = Topology::new()?;
    let server = sized_server(&topo)?;
    let agent = agent_with_group(&topo, &group)?;
    let mut session = open_session(&topo, 2_000, 3_000)?;
    let socket = op::admin_socket(agent.dir());
    let meta = std::fs::metadata(&socket)?;
    ensure!(
        meta.mode() & 0o777 == 0o660 && meta.gid() == group.gid,
        "socket mode {:o} gid {}",
        meta.mode() & 0o777,
        meta.gid()
    );
    let (bin, sock) = (
        agent.binary().to_str().context("utf-8")?.to_owned(),
        socket.to_str().context("utf-8")?.to_owned(),
    );
    // uid/gid 65534 (nobody), with and without the operator group.
    let as_nobody = |groups: &[&str], args: &[&str]| {
        let mut command = std::process::Command::new("setpriv");
        command
            .args(["--reuid", "65534", "--regid", "65534"])
            .args(groups)
            .arg(&bin)
            .args(args)
            .args(["--admin", &sock, "--api-timeout", "2s"]);
        run(command)
    };
    let outsider = ["--clear-groups"];
    let (status, _, stderr) = as_nobody(&outsider, &["grants", "--json"])?;
    ensure!(
        status == 1 && stderr.contains("Permission denied"),
        "an outsider lists nothing ({status}): {stderr}"
    );
    let (status, _, stderr) = as_nobody(&outsider, &["revoke", "--subject", "anyone"])?;
    ensure!(status != 0, "an outsider's revoke went through: {stderr}");
    let pin = agent.pin_dir().to_str().context("utf-8")?;
    let (status, _, stderr) = as_nobody(
        &outsider,
        &["revoke", "--subject", "anyone", "--pin-dir", pin],
    )?;
    ensure!(
        status != 0,
        "an outsider's revoke via pins went through: {stderr}"
    );
    session.set_read_timeout(Some(Duration::from_secs(1)))?;
    ensure!(
        !op::ended(&mut session),
        "the session survives the outsider"
    );
    let gid = group.gid.to_string();
    let (status, stdout, stderr) = as_nobody(&["--groups", &gid], &["grants", "--json"])?;
    let doc: Value = serde_json::from_str(&stdout).with_context(|| stderr.clone())?;
    ensure!(
        status == 0 && doc["source"] == "api",
        "a member reaches the API: {doc:#}"
    );
    op::close(session);
    drop(agent);
    ensure!(!socket.exists(), "the socket is removed on stop");
    server.stop()?;
    Ok(())
}
