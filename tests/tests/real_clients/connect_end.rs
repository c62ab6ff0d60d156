//! How `tcpgate connect` (stdin/stdout mode, as an ssh `ProxyCommand`)
//! ends: at once and non-zero when the agent resets its session, even with
//! stdin still open; after a half-close by either side, once the other side
//! is done too.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tcpgate_tests::{ChildGuard, require_root, serve_once};

use tcpgate_tests::auth_fixture::{AuthFixture, echo_service, policy};

/// Bound for "did not hang": far above what any step here takes.
const HANG: Duration = Duration::from_secs(20);

/// A running `tcpgate connect` from the runner to a target port, stdin and
/// stdout piped; stdout is read on a thread, so no read can hang the test.
struct Connect {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    stdout: Receiver<Vec<u8>>,
    stderr: std::path::PathBuf,
}

impl Connect {
    fn spawn(fx: &AuthFixture, port: u16, extra: &[&str]) -> Result<Self> {
        let token = fx.token_file(&fx.token())?;
        let stderr = fx.agent.dir().join(format!("connect-{port}.stderr"));
        let mut command = fx.topo.runner.command(fx.agent.binary());
        command
            .arg("connect")
            .arg("--token-file")
            .arg(&token)
            .args(extra)
            .arg(AuthFixture::target(port).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr)?);
        let mut child = ChildGuard::new(command.spawn()?, "tcpgate connect");
        let stdin = child.child_mut().stdin.take();
        let mut stdout = child.child_mut().stdout.take().context("piped stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                // An empty chunk says EOF (or a read error).
                let n = stdout.read(&mut buf).unwrap_or(0);
                if tx.send(buf[..n].to_vec()).is_err() || n == 0 {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            stdout: rx,
            stderr,
        })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(bytes)?;
        Ok(stdin.flush()?)
    }

    /// Reads stdout until `want` bytes arrived.
    fn receive(&self, want: usize) -> Result<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < want {
            let chunk = self.stdout.recv_timeout(HANG)?;
            ensure!(!chunk.is_empty(), "stdout ended after {got:?}");
            got.extend(chunk);
        }
        Ok(got)
    }

    /// Reads stdout to its EOF.
    fn receive_to_eof(&self) -> Result<Vec<u8>> {
        let mut got = Vec::new();
        loop {
            let chunk = self.stdout.recv_timeout(HANG).with_context(|| {
                format!("stdout still open after {HANG:?}, having read {got:?}")
            })?;
            if chunk.is_empty() {
                return Ok(got);
            }
            got.extend(chunk);
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

#[test]
fn connect_exits_when_the_agent_resets_the_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Sessions last 3 s: the agent resets them when the grant expires.
    let fx = AuthFixture::start_with(&policy("3s"), &[])?;
    let _echo = echo_service(&fx, b"")?;
    let mut connect = Connect::spawn(&fx, 9000, &[])?;
    connect.send(b"ping\n")?;
    ensure!(connect.receive(5)? == b"ping\n", "echo through the session");
    let closed = fx
        .agent
        .wait_for_audit(|e| e["event"] == "session_close", HANG)?;
    ensure!(closed["reason"] == "grant_expired", "{closed}");
    // stdin is still open (`connect.stdin` is held): only the reset ends it.
    let status = connect.child.wait_timeout(Duration::from_secs(1))?;
    let Some(status) = status else {
        bail!("tcpgate connect still runs 1 s after the agent ended its session");
    };
    ensure!(!status.success(), "exit status after a reset: {status}");
    ensure!(
        connect.receive_to_eof()?.is_empty(),
        "nothing after the echo"
    );
    ensure!(
        connect.stderr().contains("reset"),
        "stderr: {}",
        connect.stderr()
    );
    ensure!(connect.stdin.is_some());
    Ok(())
}

#[test]
fn connect_relays_half_closes_both_ways() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;

    // stdin ends first: the service sees EOF and answers after it.
    let service = serve_once(&fx.topo.target, AuthFixture::target(9000), |mut s, _| {
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        s.write_all(format!("got {} bytes", got.len()).as_bytes())?;
        Ok::<_, std::io::Error>(got)
    })?;
    let mut connect = Connect::spawn(&fx, 9000, &[])?;
    connect.send(b"hello")?;
    drop(connect.stdin.take());
    ensure!(
        connect.receive_to_eof()? == b"got 5 bytes",
        "answer after EOF"
    );
    ensure!(service.join()?? == b"hello");
    let status = connect.child.wait_timeout(HANG)?.context("still running")?;
    ensure!(status.success(), "{status}: {}", connect.stderr());

    // The service ends first, but keeps reading: stdout ends at once, and
    // what stdin sends afterwards still arrives.
    let service = serve_once(&fx.topo.target, AuthFixture::target(5432), |mut s, _| {
        s.write_all(b"bye")?;
        s.shutdown(Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok::<_, std::io::Error>(got)
    })?;
    let mut connect = Connect::spawn(&fx, 5432, &["--linger", "60s"])?;
    ensure!(
        connect.receive_to_eof()? == b"bye",
        "service's bytes, then EOF"
    );
    ensure!(
        connect.child.try_wait()?.is_none(),
        "exited before stdin ended"
    );
    connect.send(b"late")?;
    drop(connect.stdin.take());
    ensure!(service.join()?? == b"late", "stdin after the service's EOF");
    let status = connect.child.wait_timeout(HANG)?.context("still running")?;
    ensure!(status.success(), "{status}: {}", connect.stderr());

    // The service ends first and stdin stays open past --linger: exit 1.
    let service = serve_once(&fx.topo.target, AuthFixture::target(22), |mut s, _| {
        s.write_all(b"bye")
    })?;
    let connect = &mut Connect::spawn(&fx, 22, &["--linger", "100ms"])?;
    ensure!(connect.receive_to_eof()? == b"bye");
    service.join()??;
    let status = connect.child.wait_timeout(HANG)?.context("still running")?;
    ensure!(!status.success(), "stdin open past --linger: {status}");
    ensure!(
        connect.stderr().contains("closed the connection"),
        "stderr: {}",
        connect.stderr()
    );
    Ok(())
}
