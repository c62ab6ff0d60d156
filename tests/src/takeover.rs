//! Takeover fixtures: a successor of a running agent (`tcpgate run
//! --takeover` with the same configuration), and a transfer each way that
//! stops at checkpoints, so a takeover provably happens while both
//! directions still have bytes to move.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use sha2::{Digest as _, Sha256};

use crate::{Agent, Digest, ForwardFixture, Netns, Payload};

/// Bound on one leg of a transfer between two checkpoints.
const LEG_BOUND: Duration = Duration::from_secs(600);
const CHUNK: usize = 256 * 1024;

/// `[agent]` lines giving an agent a takeover socket of its own in `dir`.
pub fn agent_lines(dir: &Path) -> String {
    format!(
        "takeover_socket = {:?}\ntakeover_timeout = \"20s\"\n",
        dir.join("takeover.sock").display().to_string()
    )
}

/// An `[admin]` section with an operator socket in `dir`: every agent
/// sharing the configuration binds it in turn (the last one answers).
pub fn admin_lines(dir: &Path) -> String {
    format!(
        "\n[admin]\nsocket = {:?}\n",
        dir.join("admin.sock").display().to_string()
    )
}

/// `GET /v1/sessions` on the operator socket in `dir` (see
/// [`admin_lines`]): the live sessions of the agent answering there.
pub fn listed_sessions(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let answer = crate::metrics::get_unix(&dir.join("admin.sock"), "/v1/sessions")?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end: {answer:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}: {body}");
    let doc: serde_json::Value = serde_json::from_str(body).with_context(|| body.to_owned())?;
    doc.as_array().cloned().context("a sessions array")
}

/// The first line of `agent`'s log containing `needle`, without its
/// colour codes (fields then read `name=value`).
pub fn log_line(agent: &Agent, needle: &str) -> Option<String> {
    let logs = agent.logs();
    let line = logs.lines().find(|l| l.contains(needle))?;
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    Some(plain)
}

/// The value of field `name` in a [`log_line`].
#[must_use]
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split_whitespace().next()
}

/// A runner's streaming session through an authenticating agent (started
/// with `args` and a takeover socket of its own), admitted by a grant
/// expiring at `exp`, and a successor (same `args`) that took over.
pub struct GrantedTakeover {
    pub fx: crate::auth_fixture::AuthFixture,
    pub dir: tempfile::TempDir,
    pub server: crate::AcceptLoop<u64>,
    pub token: String,
    pub grant: String,
    /// The session's client end; it has read a first chunk.
    pub stream: TcpStream,
    pub next: Agent,
}

impl GrantedTakeover {
    pub fn start(args: &[&str], exp: u64, jti: &str) -> Result<Self> {
        use crate::auth_fixture::{AuthFixture, Launch, policy, streamer};
        let dir = tempfile::tempdir()?;
        let fx = AuthFixture::start_launched(
            &policy("15m"),
            args,
            Launch {
                agent_extra: agent_lines(dir.path()),
                ..Launch::default()
            },
        )?;
        let server = streamer(&fx, Duration::from_secs(90))?;
        let token = fx.keys.rsa.sign(&crate::tokens::claims_with(&[
            ("exp", serde_json::json!(exp)),
            ("jti", serde_json::json!(jti)),
        ]));
        let grant = fx.grant_from_runner(&token, &[])?;
        let mut stream = fx.dial_from_runner(AuthFixture::target(5432))?;
        let mut buf = vec![0u8; 64 * 1024];
        stream.read_exact(&mut buf)?;
        let next = successor(&fx.topo.bastion, fx.agent.config_path(), args, &[])?;
        wait_taken_over(&fx.agent)?;
        Ok(Self {
            fx,
            dir,
            server,
            token,
            grant,
            stream,
            next,
        })
    }
}

/// Starts `tcpgate run --takeover` in `ns` with the configuration at
/// `config` (a running agent's: its pin directory, audit file and takeover
/// socket), plus `args`, and waits for it to be ready: it then accepts on
/// the inherited listeners.
pub fn successor(ns: &Netns, config: &Path, args: &[&str], envs: &[(&str, &str)]) -> Result<Agent> {
    let config = std::fs::read_to_string(config)?;
    let mut builder = Agent::builder(ns)?
        .config(config)
        .arg("--takeover")
        .args(args)
        .ready_timeout(Duration::from_secs(60));
    for (key, value) in envs {
        builder = builder.env(key, value);
    }
    Ok(builder.spawn()?)
}

/// Waits until `old` says it was taken over.
pub fn wait_taken_over(old: &Agent) -> Result<()> {
    Ok(old.wait_for_log(
        "taken over: no new connections here",
        Duration::from_secs(30),
    )?)
}

/// A transfer of `up` (client → server) and `down` (server → client)
/// bytes in `legs` legs: after each but the last, both directions stop
/// until [`SteppedTransfer::resume`].
pub struct SteppedTransfer {
    progress: Receiver<&'static str>,
    go: Vec<Sender<()>>,
    writer: JoinHandle<std::io::Result<()>>,
    reader: JoinHandle<std::io::Result<(u64, Digest)>>,
}

impl SteppedTransfer {
    pub fn start(stream: TcpStream, up: Payload, down: u64, legs: u64) -> Result<Self> {
        let (progress, progress_rx) = channel();
        let (go_writer, writer_go) = channel();
        let (go_reader, reader_go) = channel();
        let mut out = stream.try_clone()?;
        let mut input = stream;
        let writer_progress = progress.clone();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = vec![0u8; CHUNK];
            for leg in 0..legs {
                let (mut at, end) = (up.len * leg / legs, up.len * (leg + 1) / legs);
                while at < end {
                    let n = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
                    up.fill(at, &mut buf[..n]);
                    out.write_all(&buf[..n])?;
                    at += n as u64;
                }
                let _ = writer_progress.send("up");
                if leg + 1 < legs && writer_go.recv().is_err() {
                    return Err(std::io::Error::other("abandoned"));
                }
            }
            out.shutdown(Shutdown::Write)
        });
        let reader = std::thread::spawn(move || -> std::io::Result<(u64, Digest)> {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            for leg in 0..legs {
                let end = down * (leg + 1) / legs;
                while got < end {
                    let want = usize::try_from(end - got).unwrap_or(CHUNK).min(CHUNK);
                    let n = input.read(&mut buf[..want])?;
                    if n == 0 {
                        return Ok((got, Digest(hasher.finalize().into())));
                    }
                    hasher.update(&buf[..n]);
                    got += n as u64;
                }
                let _ = progress.send("down");
                if leg + 1 < legs && reader_go.recv().is_err() {
                    return Err(std::io::Error::other("abandoned"));
                }
            }
            // Anything past `down` is an error the caller sees in the count.
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    return Ok((got, Digest(hasher.finalize().into())));
                }
                hasher.update(&buf[..n]);
                got += n as u64;
            }
        });
        Ok(Self {
            progress: progress_rx,
            go: vec![go_writer, go_reader],
            writer,
            reader,
        })
    }

    /// Waits until both directions reached their next checkpoint.
    pub fn wait_checkpoint(&self) -> Result<()> {
        for _ in 0..2 {
            self.progress
                .recv_timeout(LEG_BOUND)
                .context("a direction did not reach its checkpoint")?;
        }
        Ok(())
    }

    pub fn resume(&self) {
        for go in &self.go {
            let _ = go.send(());
        }
    }

    /// Waits for the end of both directions; returns what the client read.
    pub fn finish(self) -> Result<(u64, Digest)> {
        self.resume();
        self.writer
            .join()
            .map_err(|_| anyhow!("writer panicked"))?
            .context("client upload")?;
        let read = self
            .reader
            .join()
            .map_err(|_| anyhow!("reader panicked"))?
            .context("client download")?;
        Ok(read)
    }
}

/// Checks the server's view (bytes read, digest) against what was sent.
pub fn check_digest(what: &str, got: (u64, Digest), sent: &Payload) -> Result<()> {
    ensure!(
        got.0 == sent.len && got.1 == sent.digest(),
        "{what}: {} of {} bytes arrived, or the SHA-256 differs",
        got.0,
        sent.len
    );
    Ok(())
}

/// One short session through the forward: the server greets first, so the
/// splice is in place before the client speaks and closes.
pub fn echo_once(fx: &ForwardFixture, message: &'static [u8]) -> Result<()> {
    let server = crate::serve_once(&fx.topo.target, fx.upstream_addr(), |mut s, _| {
        s.write_all(b"!")?;
        let got = crate::read_to_end_hashed(&mut s)?;
        s.shutdown(Shutdown::Write)?;
        anyhow::Ok(got)
    })?;
    let mut stream = fx.dial()?;
    let mut greeting = [0u8; 1];
    stream.read_exact(&mut greeting)?;
    stream.write_all(message)?;
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    ensure!(
        server.join()??.0 == message.len() as u64,
        "the agent forwards"
    );
    Ok(())
}

/// The upstream of a duplex transfer: it sends `reply`, half-closes, and
/// yields what it read (length and digest) once the client half-closes.
pub fn duplex_upstream(
    fx: &ForwardFixture,
    reply: Payload,
) -> Result<crate::OneShot<Result<(u64, Digest)>>> {
    duplex_server(&fx.topo.target, fx.upstream_addr(), reply)
}

/// [`duplex_upstream`] on any address of any namespace.
pub fn duplex_server(
    ns: &Netns,
    addr: std::net::SocketAddr,
    reply: Payload,
) -> Result<crate::OneShot<Result<(u64, Digest)>>> {
    Ok(crate::serve_once(ns, addr, move |mut stream, _| {
        let mut out = stream.try_clone()?;
        let writer = std::thread::spawn(move || {
            crate::write_payload(&mut out, &reply)?;
            out.shutdown(Shutdown::Write)
        });
        let got = crate::read_to_end_hashed(&mut stream)?;
        writer.join().map_err(|_| anyhow!("server writer"))??;
        Ok(got)
    })?)
}
