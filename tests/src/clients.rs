//! Real clients and servers the suites drive: Debian's python3 HTTP
//! server, curl, and a TCP connection from a chosen source address.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

/// A real HTTP server (Debian's python3 `http.server`) serving `body` as
/// `/file.bin`, bound to `bind:port` inside `ns`.
pub struct HttpServer {
    _child: crate::ChildGuard,
    _dir: tempfile::TempDir,
    pub body: Vec<u8>,
}

impl HttpServer {
    pub fn start(
        ns: &crate::Netns,
        bind: std::net::IpAddr,
        port: u16,
        body: Vec<u8>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("file.bin"), &body)?;
        let mut command = ns.command("python3");
        command
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                &bind.to_string(),
                "--directory",
            ])
            .arg(dir.path());
        let child = crate::ChildGuard::spawn_logged(&mut command, dir.path(), "http")?;
        let addr = SocketAddr::new(bind, port);
        wait_listening(ns, addr, "http server", Duration::from_secs(20))?;
        Ok(Self {
            _child: child,
            _dir: dir,
            body,
        })
    }
}

/// Runs curl in `ns` and returns the body it fetched.
pub fn curl(ns: &crate::Netns, url: &str) -> Result<Vec<u8>> {
    let output = ns
        .command("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "30",
            "--noproxy",
            "*",
            url,
        ])
        .output()
        .context("run curl")?;
    ensure!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output.stdout)
}

/// Connects from `ns` to `target` with the given source address (a second
/// runner sharing the namespace).
pub fn dial_from(
    ns: &crate::Netns,
    source: std::net::IpAddr,
    target: SocketAddr,
) -> Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket,
    };
    let stream = ns.run(move || -> Result<TcpStream> {
        let family = if target.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let sock = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        bind(fd, &SockaddrStorage::from(SocketAddr::new(source, 0)))?;
        connect(fd, &SockaddrStorage::from(target))?;
        Ok(TcpStream::from(sock))
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(stream)
}

/// Waits (bounded) until something accepts TCP connections on `addr`
/// inside `ns`; the error names `what`.
pub fn wait_listening(
    ns: &crate::Netns,
    addr: SocketAddr,
    what: &str,
    timeout: Duration,
) -> Result<(), crate::NotWithin> {
    crate::eventually(timeout, &format!("{what} listening on {addr}"), || {
        ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
            .is_ok()
    })
}
