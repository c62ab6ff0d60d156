//! The demo's story, step by step. Every resource is an RAII guard from the
//! test toolkit, so an error anywhere still removes namespaces, pins,
//! routes and processes.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tcpgate_tests::jwks_server::JwksServer;
use tcpgate_tests::tokens::{AUDIENCE, ISSUER, TestKey, claims_with, jwks, unix_now};
use tcpgate_tests::topology::{BASTION_RUNNER_V4, RUNNER_V4, TARGET_V4};
use tcpgate_tests::{Agent, Payload, Topology, accept_loop, read_to_end_hashed, write_payload};

use super::DemoArgs;

/// The agent's configuration; `{…}` fields are filled in at run time.
const CONFIG: &str = r#"[agent]
pin_dir = "{pin_dir}"

[audit]
path = "{audit}"

# Runners dial the real addresses; the bastion takes these over.
[intercept]
[[intercept.prefix]]
prefix = "192.0.2.0/24"
ports = ["5432", "9000"]

[auth]
audit_claims = ["project_path", "ref", "job_id"]
[[auth.issuer]]
issuer = "{issuer}"
audience = "{audience}"
jwks_url = "{jwks_url}"
ca_file = "{ca_file}"

# Protected release branches of group/app may reach the database for 15 min.
[[policy]]
name = "deploy"
issuer = "{issuer}"
max_lifetime = "15m"
match = { project_path = "group/app", ref_protected = true, ref = "release/*" }
allow = [ { prefix = "192.0.2.0/24", ports = ["5432", "9000"] } ]

# HTTPS: runners send bearer tokens here. The certificate names the
# bastion's runner-facing address; runners trust the CA with --ca.
[api]
listen = "198.51.100.1:8443"
tls_cert = "{api_cert}"
tls_key = "{api_key}"

# Operators: `tcpgate revoke --admin <socket>`; mode 0660.
[admin]
socket = "{admin_socket}"
"#;

const SERVICE_PORT: u16 = 9000;
const DATABASE_PORT: u16 = 5432;

fn step(n: u32, title: &str) {
    println!("\n[{n}/5] {title}");
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Runs the `tcpgate` CLI in the runner namespace.
fn runner_cli(topo: &Topology, tcpgate: &Path, args: &[&str]) -> Result<std::process::Output> {
    topo.runner
        .command(tcpgate)
        .args(args)
        .output()
        .context("run the tcpgate CLI")
}

/// `tcpgate grant` in the runner namespace; fails with its stderr.
fn runner_grant(
    topo: &Topology,
    tcpgate: &Path,
    token_file: &str,
    api: &str,
    ca: &str,
    allow: &str,
) -> Result<std::process::Output> {
    let grant = runner_cli(
        topo,
        tcpgate,
        &[
            "grant",
            "--token-file",
            token_file,
            "--api",
            api,
            "--ca",
            ca,
            "--allow",
            allow,
        ],
    )?;
    ensure!(
        grant.status.success(),
        "tcpgate grant failed: {}",
        String::from_utf8_lossy(&grant.stderr)
    );
    Ok(grant)
}

/// Waits (bounded) for the first audit event that `pred` accepts.
fn audit_event(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    agent
        .wait_for_audit(pred, Duration::from_secs(20))
        .with_context(|| format!("no {what} audit event; agent log:\n{}", agent.logs_tail(20)))
}

/// The `session_close` line of the runner's connection `client` →
/// `destination`. The runner sees its connection end before the agent has
/// written that line, and an earlier session's line may be the newest one
/// then; so the session id comes from the `session_open` line with the
/// connection's own addresses, and the wait is for that session's close.
fn closed_session(agent: &Agent, client: SocketAddr, destination: SocketAddr) -> Result<Value> {
    let (client, destination) = (client.to_string(), destination.to_string());
    let open = audit_event(agent, "session_open", |e| {
        e["event"] == "session_open" && e["source"] == *client && e["destination"] == *destination
    })?;
    let id = open["session_id"].clone();
    ensure!(id.is_string(), "session_open without a session id: {open}");
    audit_event(agent, "session_close", |e| {
        e["event"] == "session_close" && e["session_id"] == id
    })
}

pub fn run(tcpgate: &Path, args: &DemoArgs) -> Result<()> {
    step(
        1,
        "network: a runner, a bastion and a target, each in its own network namespace",
    );
    let topo = Topology::new()?;
    println!(
        "  runner {RUNNER_V4} ── bastion {BASTION_RUNNER_V4} / 192.0.2.1 ── target {TARGET_V4}"
    );
    println!("  the runner's route to 192.0.2.0/24 goes through the bastion");

    step(2, "the agent starts on the bastion");
    let key = TestKey::new("demo-key-1", Algorithm::RS256);
    let jwks_server = JwksServer::start(&topo.bastion, "127.0.0.1:0".parse()?, jwks(&[&key]))?;
    let builder = Agent::builder(&topo.bastion)?.binary(tcpgate);
    let api_cert =
        tcpgate_tests::tls::ca_signed(builder.dir(), "api", &[&BASTION_RUNNER_V4.to_string()]);
    let config = CONFIG
        .replace("{api_cert}", &api_cert.cert.display().to_string())
        .replace("{api_key}", &api_cert.key.display().to_string())
        .replace(
            "{admin_socket}",
            &builder.dir().join("admin.sock").display().to_string(),
        )
        .replace("{pin_dir}", &builder.pin_dir().display().to_string())
        .replace("{audit}", &builder.audit_path().display().to_string())
        .replace("{issuer}", ISSUER)
        .replace("{audience}", AUDIENCE)
        .replace("{jwks_url}", &jwks_server.url())
        .replace("{ca_file}", &jwks_server.ca_file().display().to_string());
    let agent = builder.config(config).spawn()?;
    println!("  intercepting 192.0.2.0/24 tcp/5432,9000 (sk_lookup + policy routing, no NAT)");
    println!(
        "  tokens: RS256 JWTs checked against the JWKS at {}",
        jwks_server.url()
    );
    println!(
        "  grant API: https://{BASTION_RUNNER_V4}:8443, certificate for IP {BASTION_RUNNER_V4} signed by a CA made for the demo ({})",
        api_cert.trust.display()
    );
    println!("  config: {}", agent.config_path().display());
    let ca = api_cert.trust.display().to_string();

    let echo = |mut stream: TcpStream, _| -> std::io::Result<u64> {
        // An echo service that keeps answering until its client hangs up.
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                stream.shutdown(Shutdown::Write)?;
                return Ok(total);
            }
            stream.write_all(&buf[..n])?;
            total += n as u64;
        }
    };
    let service = accept_loop(
        &topo.target,
        SocketAddr::from((TARGET_V4, SERVICE_PORT)),
        8,
        echo,
    )?;
    let database = accept_loop(
        &topo.target,
        SocketAddr::from((TARGET_V4, DATABASE_PORT)),
        8,
        echo,
    )?;
    let job_token = key.sign(&claims_with(&[]));
    let token_file = agent.dir().join("job.jwt");
    std::fs::write(&token_file, &job_token)?;
    let token_path = token_file.to_str().context("utf-8 path")?;

    step(3, "denied: a job of another project tries the same service");
    let other = agent.dir().join("other-project.jwt");
    std::fs::write(
        &other,
        key.sign(&claims_with(&[("project_path", json!("group/other"))])),
    )?;
    let target = format!("{TARGET_V4}:{SERVICE_PORT}");
    let denied = runner_cli(
        &topo,
        tcpgate,
        &[
            "connect",
            "--token-file",
            other.to_str().context("utf-8")?,
            &target,
        ],
    )?;
    println!("  $ tcpgate connect --token-file other-project.jwt {target}");
    println!("  {}", String::from_utf8_lossy(&denied.stderr).trim());
    let event = audit_event(&agent, "connection_denied", |e| {
        e["event"] == "connection_denied"
    })?;
    println!(
        "  audit: {} from {}: {}",
        event["event"],
        event["source"],
        event["detail"].as_str().unwrap_or("")
    );
    println!("  the agent made no upstream connection for it");

    step(
        4,
        "admitted: the job takes a grant, then plain clients reach the service",
    );
    let api = format!("https://{BASTION_RUNNER_V4}:8443");
    let allow = format!("{TARGET_V4}={SERVICE_PORT}");
    let grant = runner_grant(&topo, tcpgate, token_path, &api, &ca, &allow)?;
    println!("  $ tcpgate grant --token-file job.jwt --api {api} --ca ca.pem --allow {allow}");
    for line in String::from_utf8_lossy(&grant.stdout).lines() {
        println!("  {line}");
    }
    let payload = Payload::new(7, args.bytes);
    let addr = SocketAddr::from((TARGET_V4, SERVICE_PORT));
    let mut client = topo.runner.run(move || TcpStream::connect(addr))?;
    let client_addr = client.local_addr()?;
    let sender = {
        let mut client = client.try_clone()?;
        std::thread::spawn(move || -> std::io::Result<_> {
            let digest = write_payload(&mut client, &payload)?;
            client.shutdown(Shutdown::Write)?;
            Ok(digest)
        })
    };
    let (received, back_digest) = read_to_end_hashed(&mut client)?;
    let sent_digest = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    let session = closed_session(&agent, client_addr, addr)?;
    println!(
        "  runner → {target}: sent {}, got {} back (echo)",
        mib(args.bytes),
        mib(received)
    );
    println!(
        "  session {}: {} up and {} down moved by the eBPF verdict program, {} copied by the agent",
        session["session_id"].as_str().unwrap_or("?"),
        mib(session["kernel_bytes_up"].as_u64().unwrap_or(0)),
        mib(session["kernel_bytes_down"].as_u64().unwrap_or(0)),
        mib(session["userspace_bytes_up"].as_u64().unwrap_or(0)
            + session["userspace_bytes_down"].as_u64().unwrap_or(0)),
    );
    println!("  SHA-256 sent     {sent_digest}");
    println!("  SHA-256 received {back_digest}");
    if sent_digest != back_digest || received != args.bytes {
        bail!("the bytes that came back differ from the bytes sent");
    }
    println!("  checksums match: every byte arrived, in order, through the kernel splice");

    step(
        5,
        "expiry: a grant whose token ends in 3 s, while data is streaming",
    );
    let exp = unix_now() + 3;
    let short = agent.dir().join("short.jwt");
    std::fs::write(&short, key.sign(&claims_with(&[("exp", json!(exp))])))?;
    let allow = format!("{TARGET_V4}={DATABASE_PORT}");
    runner_grant(
        &topo,
        tcpgate,
        short.to_str().context("utf-8")?,
        &api,
        &ca,
        &allow,
    )?;
    println!("  $ tcpgate grant --token-file short.jwt --api {api} --ca ca.pem --allow {allow}");
    let addr = SocketAddr::from((TARGET_V4, DATABASE_PORT));
    let mut stream = topo.runner.run(move || TcpStream::connect(addr))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let stream_addr = stream.local_addr()?;
    let writer = {
        let mut stream = stream.try_clone()?;
        std::thread::spawn(move || {
            let chunk = vec![0x5a_u8; 16 * 1024];
            while stream.write_all(&chunk).is_ok() {
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut streamed = 0u64;
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        streamed += n as u64;
    }
    let ended = SystemTime::now();
    let _ = writer.join();
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
    let late = ended.duration_since(expiry).unwrap_or_default();
    let session = closed_session(&agent, stream_addr, addr)?;
    if args.verbose {
        println!("\nagent log:\n{}", agent.logs());
    }
    println!("  streamed {} before the grant ended", mib(streamed));
    println!(
        "  the runner saw the connection end {} ms after the token's exp; reason: {}",
        late.as_millis(),
        session["reason"].as_str().unwrap_or("?")
    );
    ensure!(
        session["reason"] == "grant_expired",
        "expected grant_expired: {session}"
    );

    drop((service, database));
    let pin_dir = agent.pin_dir().to_owned();
    drop(agent);
    drop(jwks_server);
    let names = [
        topo.runner.name().to_owned(),
        topo.bastion.name().to_owned(),
        topo.target.name().to_owned(),
    ];
    drop(topo);
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let left = String::from_utf8_lossy(&left.stdout);
    ensure!(
        !names.iter().any(|n| left.contains(n.as_str())),
        "namespaces left behind: {left}"
    );
    ensure!(
        !pin_dir.exists(),
        "pins left behind in {}",
        pin_dir.display()
    );
    println!("\ndone: agent stopped; namespaces, pins, routes and processes removed.");
    Ok(())
}
