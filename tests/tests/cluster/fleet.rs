//! The fleet the cluster tests share: an etcd, bastions joined to it,
//! services behind them, and what a test asks of a bastion.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::{AuthFixture, Launch, policy};
use tcpgate_tests::etcd::{Etcd, EtcdLink};
use tcpgate_tests::eventually;
use tcpgate_tests::{Agent, Payload, Topology, accept_loop};

pub const SUBJECT: &str = "project_path:group/app:ref_type:branch:ref:release/1.4";
/// Bound for a change to reach another bastion (the goal is 1 s; this only
/// says "did not hang").
pub const PROPAGATION: Duration = Duration::from_secs(20);

/// One bastion of the fleet, and its link to etcd.
pub struct Bastion {
    pub fx: AuthFixture,
    pub link: EtcdLink,
}

/// `[cluster]` for bastion `name` on `link`, with `extra` lines (TLS).
fn cluster_section(link: &EtcdLink, name: &str, extra: &str) -> String {
    format!(
        "[cluster]\netcd = {}\nname = {name:?}\ntimeout = \"1s\"\n{extra}",
        link.toml_urls()
    )
}

pub fn bastion(etcd: &mut Etcd, name: &str) -> Result<Bastion> {
    bastion_with(etcd, name, "")
}

/// A bastion whose `[cluster]` has `extra` lines (`ca`, `cert`, `key`).
pub fn bastion_with(etcd: &mut Etcd, name: &str, extra: &str) -> Result<Bastion> {
    let topo = Topology::new()?;
    let link = etcd.link(&topo.bastion)?;
    let launch = Launch {
        sections: cluster_section(&link, name, extra),
        topology: Some(topo),
        ..Launch::default()
    };
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    Ok(Bastion { fx, link })
}

/// An etcd of `members` members and two bastions, A and B, in it.
pub fn fleet(members: usize) -> Result<(Etcd, Bastion, Bastion)> {
    let mut etcd = Etcd::start(members)?;
    let a = bastion(&mut etcd, "bastion-a")?;
    let b = bastion(&mut etcd, "bastion-b")?;
    Ok((etcd, a, b))
}

impl Bastion {
    /// Whether a plain client behind this bastion gets the greeting of the
    /// echo service on 192.0.2.10:9000 (a source grant admits it; without
    /// one the agent waits for a preamble and closes).
    pub fn admits(&self) -> bool {
        let Ok(mut stream) = self.fx.dial_from_runner(AuthFixture::target(9000)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut greeting = [0u8; 6];
        stream.read_exact(&mut greeting).is_ok() && &greeting == b"HELLO\n"
    }

    /// A session through this bastion to the streaming server on :5432,
    /// with its first bytes read.
    pub fn streaming_session(&self) -> Result<TcpStream> {
        let mut stream = self.fx.dial_from_runner(AuthFixture::target(5432))?;
        let mut first = [0u8; 1024];
        stream.read_exact(&mut first).context("first bytes")?;
        Ok(stream)
    }

    pub fn revoke_subject(&self) -> Result<(i32, String, String)> {
        let admin = self.fx.admin_socket().display().to_string();
        self.fx.cli(
            &self.fx.topo.bastion,
            &["revoke", "--admin", &admin, "--subject", SUBJECT],
        )
    }

    /// `tcpgate grant` from this bastion's runner: (status, stdout, stderr).
    pub fn try_grant(&self, token: &str) -> Result<(i32, String, String)> {
        let file = self.fx.token_file(token)?;
        let api = AuthFixture::api_url();
        let ca = self.fx.api_ca.display().to_string();
        let file = file.display().to_string();
        self.fx.cli(
            &self.fx.topo.runner,
            &[
                "grant",
                "--token-file",
                &file,
                "--api",
                &api,
                "--ca",
                &ca,
                "--json",
            ],
        )
    }

    /// Gives `grant` back through this bastion's grant API
    /// (`DELETE /v1/grants/{id}` with the job's `token`), from its runner.
    pub fn give_back(&self, grant: &str, token: &str) -> Result<()> {
        let output = self
            .fx
            .topo
            .runner
            .command("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-X", "DELETE", "--cacert"])
            .arg(&self.fx.api_ca)
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .arg(format!("{}/v1/grants/{grant}", AuthFixture::api_url()))
            .output()?;
        let code = String::from_utf8_lossy(&output.stdout);
        ensure!(
            code.trim() == "204",
            "give back: {code}; log: {}",
            self.fx.agent.logs_tail(20)
        );
        Ok(())
    }

    /// A counter or gauge of this bastion's `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = self.admin_get("/metrics")?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0))
    }

    /// GET on the operator socket.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        let output = std::process::Command::new("curl")
            .args(["-s", "--max-time", "10", "--unix-socket"])
            .arg(self.fx.admin_socket())
            .arg(format!("http://localhost{path}"))
            .output()
            .context("curl")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Echo service (greets first) on :9000 and a streaming server on :5432
/// behind `b`.
pub struct Services {
    _echo: tcpgate_tests::AcceptLoop<std::net::SocketAddr>,
    _stream: tcpgate_tests::AcceptLoop<u64>,
}

pub fn services(b: &Bastion) -> Result<Services> {
    let echo = tcpgate_tests::auth_fixture::echo_service(&b.fx, b"HELLO\n")?;
    let stream = accept_loop(
        &b.fx.topo.target,
        AuthFixture::target(5432),
        10,
        |mut stream, _| {
            let chunk = Payload::new(1, 16 * 1024).to_vec();
            let mut sent = 0u64;
            let deadline = Instant::now() + Duration::from_secs(90);
            while Instant::now() < deadline && stream.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        },
    )?;
    Ok(Services {
        _echo: echo,
        _stream: stream,
    })
}

/// Reads until the stream ends (or the read timeout says it did not).
pub fn ended(stream: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// Waits (bounded) for `n` session_close events of `agent` with `reason`.
pub fn closed_with(agent: &Agent, reason: &str, n: usize) -> Result<Vec<serde_json::Value>> {
    let matching = || -> Vec<serde_json::Value> {
        agent
            .audit_events()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["event"] == "session_close" && e["reason"] == reason)
            .collect()
    };
    eventually(
        Duration::from_secs(60),
        &format!("{n} sessions closed as {reason}"),
        || matching().len() >= n,
    )?;
    Ok(matching())
}
