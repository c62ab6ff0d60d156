//! The fleet measures (`--only fleet`): the grant API's latency and
//! throughput on a bastion alone and on one whose grants go to etcd first,
//! and how long a revocation made on bastion B takes to reset the live
//! sessions on bastion A.
//!
//! The bastions are the integration tests' ([`AuthFixture`]): the grant API
//! over TLS as runners use it, one new connection per grant, like `tcpgate
//! grant`. etcd is the tests' fixture too: one member, in a namespace of its
//! own joined to each bastion by a veth pair.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, policy};
use tcpgate_tests::etcd::Etcd;
use tcpgate_tests::tokens::claims_with;
use tcpgate_tests::topology::BASTION_RUNNER_V4;
use tcpgate_tests::{Topology, accept_loop, eventually, http};

use super::interrupt;
use super::results::{Metric, Results};
use super::settings::Settings;
use super::stats::{percentile, sorted};

/// The grant API's port in the tests' bastions.
const API: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(BASTION_RUNNER_V4), 8080);
/// A server behind bastion A that greets, then holds the connection.
const HOLD_PORT: u16 = 9000;
/// The measured grants: narrowed to ssh on the target (so the revocation
/// measure's sessions, on HOLD_PORT, are admitted only under its own
/// grant) and short, so the store and the pinned map stay small.
const GRANT_BODY: &str =
    r#"{"destinations":[{"prefix":"192.0.2.10/32","ports":["22"]}],"lifetime":"3s"}"#;
/// Enough grants per runner for a throughput run (the default is 64).
const LIMITS: &str = "[auth.limits]\ngrants_per_source = 1000000\ngrants_per_subject = 1000000\nmax_grants = 1000000\n";
/// How long a change may take to reach another bastion before the bench
/// gives up on it.
const PROPAGATION: Duration = Duration::from_secs(20);

pub const ALONE: &str = "tcpgate";
pub const WITH_ETCD: &str = "tcpgate + etcd";
pub const FLEET: &str = "tcpgate fleet (revoke on B, reset on A)";

fn bastion(
    binary: &Path,
    topo: Topology,
    cluster: String,
    settings: &Settings,
) -> Result<AuthFixture> {
    settings.congestion_control.pin(&topo)?;
    let launch = Launch {
        binary: Some(binary.to_owned()),
        sections: format!("{LIMITS}{cluster}"),
        topology: Some(topo),
        ..Launch::default()
    };
    AuthFixture::start_launched(&policy("15m"), &[], launch)
}

/// A bastion in the fleet of `etcd`, named `name`.
fn member(binary: &Path, etcd: &mut Etcd, name: &str, settings: &Settings) -> Result<AuthFixture> {
    let topo = Topology::new()?;
    let link = etcd.link(&topo.bastion)?;
    let cluster = format!("[cluster]\netcd = {}\nname = {name:?}\n", link.toml_urls());
    bastion(binary, topo, cluster, settings)
}

/// One `POST /v1/grants` over a new TLS connection, from the calling
/// thread's namespace; how long it took.
fn grant_once(ca: &Path, token: &str, body: &str) -> Result<Duration> {
    let started = Instant::now();
    let tcp = TcpStream::connect_timeout(&API, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = tcpgate_tests::tls::client(tcp, ca, &BASTION_RUNNER_V4.to_string())?;
    let request = http::post_head(&API.to_string(), "/v1/grants", token, body);
    let answer = http::parse_response(&http::exchange(&mut tls, &request)?)?;
    let took = started.elapsed();
    ensure!(
        answer.status == 201,
        "grant API answered {}: {}",
        answer.status,
        answer.body
    );
    Ok(took)
}

/// `count` grants one after another: (p50, p99) in ms.
fn grant_latency(fx: &AuthFixture, count: usize) -> Result<(f64, f64)> {
    let (ca, token) = (fx.api_ca.clone(), fx.token());
    let samples = fx.topo.runner.run(move || -> Result<Vec<f64>> {
        (0..count)
            .map(|_| grant_once(&ca, &token, GRANT_BODY).map(|d| d.as_secs_f64() * 1e3))
            .collect()
    })?;
    let samples = sorted(samples);
    Ok((
        percentile(&samples, 50.0).unwrap_or(0.0),
        percentile(&samples, 99.0).unwrap_or(0.0),
    ))
}

/// Grants per second with `workers` runners' requests in flight.
fn grant_rate(fx: &AuthFixture, workers: usize, seconds: f64) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (ca, token) = (fx.api_ca.clone(), fx.token());
            fx.topo.runner.spawn_thread(move || -> Result<u64> {
                let mut granted = 0;
                while Instant::now() < deadline {
                    grant_once(&ca, &token, GRANT_BODY)?;
                    granted += 1;
                }
                Ok(granted)
            })
        })
        .collect::<Result<_, _>>()?;
    let mut total = 0;
    for thread in threads {
        total += thread.join()?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The grant API, alone and with etcd, taking turns.
fn grant_api(bench: &Fleet<'_>, rep: usize, results: &mut Results) -> Result<()> {
    let s = bench.settings;
    let mut order = [(ALONE, &bench.alone), (WITH_ETCD, &bench.a)];
    if rep % 2 == 1 {
        order.reverse();
    }
    for (subject, fx) in order {
        interrupt::check()?;
        let (p50, p99) = grant_latency(fx, s.grant_requests)?;
        let rate = grant_rate(fx, s.grant_workers, s.grant_seconds)?;
        results.add(Metric::GrantApiP50, subject, p50);
        results.add(Metric::GrantApiP99, subject, p99);
        results.add(Metric::GrantsPerSecond, subject, rate);
        println!(
            "        grant API {subject:<15} p50 {p50:6.2} ms  p99 {p99:6.2} ms  {rate:7.0} grants/s"
        );
    }
    Ok(())
}

/// A revocation on B of a subject with `sessions` live sessions on A:
/// (p50, p99) in ms from the call until each session is reset.
fn revocation(bench: &Fleet<'_>, rep: usize, sessions: usize) -> Result<(f64, f64)> {
    let (a, b) = (&bench.a, &bench.b);
    // The grant API measures' short grants expire first: their leases'
    // deletions would queue in the watches ahead of the revocation.
    for fx in [a, b] {
        let admin = fx.admin_socket();
        eventually(
            PROPAGATION,
            "the grant API measures' grants expired",
            || metric(&admin, "tcpgate_grants_live").is_ok_and(|n| n == 0.0),
        )?;
    }
    // A subject of this run's own: a revoked subject stays refused.
    let git_ref = format!("release/9.{rep}");
    let subject = format!("project_path:group/app:ref_type:branch:ref:{git_ref}");
    let token = a.keys.rsa.sign(&claims_with(&[
        ("ref", json!(git_ref)),
        ("sub", json!(subject)),
        ("jti", json!(format!("bench-revocation-{rep}"))),
    ]));
    let (ca, granted) = (a.api_ca.clone(), token.clone());
    a.topo.runner.run(move || grant_once(&ca, &granted, "{}"))?;
    let admin = b.admin_socket();
    eventually(PROPAGATION, "B holds A's grant", || {
        admin_get(&admin, "/v1/grants").is_ok_and(|g| g.contains(&subject))
    })?;
    let target = AuthFixture::target(HOLD_PORT);
    let streams = a.topo.runner.run(move || -> Result<Vec<TcpStream>> {
        (0..sessions)
            .map(|_| {
                let mut stream = TcpStream::connect(target)?;
                stream.set_read_timeout(Some(PROPAGATION))?;
                let mut greeting = [0u8; 3];
                stream
                    .read_exact(&mut greeting)
                    .context("a session through A")?;
                // The client speaks too, as psql does: a client still
                // silent is in its preamble window, where the agent ends a
                // revoked session only when the window closes.
                stream.write_all(b"x").context("a session through A")?;
                Ok(stream)
            })
            .collect()
    })?;
    // One thread per session, blocked in read until the reset.
    let waiters: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => return Some(Instant::now()),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                        Err(_) => return Some(Instant::now()),
                    }
                }
            })
        })
        .collect();
    let admin = b.admin_socket().display().to_string();
    let called = Instant::now();
    let (status, stdout, stderr) = b.cli(
        &b.topo.bastion,
        &["revoke", "--admin", &admin, "--subject", &subject],
    )?;
    ensure!(status == 0, "revoke on B: {stdout} {stderr}");
    let mut samples = Vec::with_capacity(sessions);
    for waiter in waiters {
        let Some(reset) = waiter.join().ok().flatten() else {
            bail!("a session on A outlived the revocation on B by {PROPAGATION:?}");
        };
        samples.push(reset.saturating_duration_since(called).as_secs_f64() * 1e3);
    }
    let samples = sorted(samples);
    println!(
        "        resets after {:.1} ms (first) .. {:.1} ms (last)",
        samples.first().copied().unwrap_or(0.0),
        samples.last().copied().unwrap_or(0.0)
    );
    Ok((
        percentile(&samples, 50.0).unwrap_or(0.0),
        percentile(&samples, 99.0).unwrap_or(0.0),
    ))
}

/// GET on an operator socket, with curl (as an operator would).
fn admin_get(socket: &Path, path: &str) -> Result<String> {
    let output = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://localhost{path}"))
        .output()
        .context("curl")?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A gauge or counter of the agent behind `socket` (0 when absent).
fn metric(socket: &Path, name: &str) -> Result<f64> {
    let text = admin_get(socket, "/metrics")?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0))
}

/// The bastions: one alone, and A and B in a fleet.
struct Fleet<'a> {
    settings: &'a Settings,
    alone: AuthFixture,
    a: AuthFixture,
    b: AuthFixture,
}

pub fn run(binary: &Path, settings: &Settings, results: &mut Results) -> Result<()> {
    let alone =
        bastion(binary, Topology::new()?, String::new(), settings).context("a lone bastion")?;
    let mut etcd = Etcd::start(1).context("etcd (Debian's etcd-server)")?;
    let a = member(binary, &mut etcd, "bastion-a", settings).context("bastion A")?;
    let b = member(binary, &mut etcd, "bastion-b", settings).context("bastion B")?;
    let sessions = settings.revocation_sessions;
    let _hold = accept_loop(
        &a.topo.target,
        AuthFixture::target(HOLD_PORT),
        sessions * settings.fleet_runs,
        |mut stream, _| {
            let _ = stream.write_all(b"HI\n");
            let mut buf = [0u8; 64];
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        },
    )?;
    let fleet = Fleet {
        settings,
        alone,
        a,
        b,
    };
    for rep in 0..settings.fleet_runs {
        println!("fleet run {}/{}", rep + 1, settings.fleet_runs);
        grant_api(&fleet, rep, results)?;
        interrupt::check()?;
        let (p50, p99) = revocation(&fleet, rep, sessions)?;
        results.add(Metric::RevocationP50, FLEET, p50);
        results.add(Metric::RevocationP99, FLEET, p99);
        println!(
            "        revoke on B → {sessions} sessions reset on A: p50 {p50:.1} ms  p99 {p99:.1} ms"
        );
    }
    drop(fleet);
    drop(etcd);
    Ok(())
}
