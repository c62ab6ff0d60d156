//! Routed grants (`[intercept.routed_grants]`): the fixture and the checks
//! the routed suites share.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use anyhow::Result;

use crate::auth_fixture::{AuthFixture, Launch, policy};
use crate::topology::{BASTION_RUNNER_IF, RUNNER_V4};

/// An agent with routed grants on the runner-facing interface, flows
/// lingering 300 ms after they end; `extra` adds lines to the section.
pub fn routed_fixture(extra: &str) -> Result<AuthFixture> {
    AuthFixture::start_launched(&policy("15m"), &[], routed_launch(extra))
}

/// [`routed_fixture`]'s launch, for callers that add to it.
pub fn routed_launch(extra: &str) -> Launch {
    routed_launch_lingering("300ms", extra)
}

/// [`routed_launch`] with finished flows lingering `linger`.
pub fn routed_launch_lingering(linger: &str, extra: &str) -> Launch {
    Launch {
        intercept_extra: format!("interfaces = [{BASTION_RUNNER_IF:?}]"),
        sections: format!(
            "\n[intercept.routed_grants]\nenabled = true\nlinger = {linger:?}\n{extra}"
        ),
        ..Launch::default()
    }
}

/// Reads to the end; whether the stream ended in a reset (as an endpoint
/// sees the agent's RST), not a FIN.
pub fn ends_in_reset(stream: &mut TcpStream) -> bool {
    read_until_end(stream).1
}

/// Everything read until the end, and whether the end was a reset.
pub fn read_until_end(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, e.kind() == ErrorKind::ConnectionReset),
        }
    }
}

/// How [`dial_v4`] sets its socket up.
#[derive(Debug, Clone, Copy, Default)]
pub struct DialOptions {
    /// `SO_MARK` (a forged routed mark).
    pub mark: Option<u32>,
    /// Bound before connecting (with `SO_REUSEADDR`): a fixed source.
    pub local: Option<SocketAddrV4>,
}

/// An IPv4 connection from the calling thread's namespace to `target`.
pub fn dial_v4(target: SocketAddr, options: DialOptions) -> Result<TcpStream> {
    use nix::sys::socket::{SockaddrIn, connect};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(v4) = target else {
        anyhow::bail!("IPv4 only")
    };
    let fd = socket_v4(options)?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(v4))?;
    Ok(TcpStream::from(fd))
}

/// Connects with `MSG_FASTOPEN` (TCP Fast Open without a cookie: the
/// runner needs `net.ipv4.tcp_fastopen = 5`), so the SYN carries `data`'s
/// first bytes; writes the rest. Set up as [`dial_v4`] (only
/// `options.local` and `options.mark`). Returns the stream and how many
/// bytes the SYN took.
pub fn fast_open_v4(
    target: SocketAddr,
    data: &[u8],
    options: DialOptions,
) -> Result<(TcpStream, usize)> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(v4) = target else {
        anyhow::bail!("IPv4 only")
    };
    let fd = socket_v4(options)?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `data` and `addr` outlive the call; the lengths are theirs,
    // and `fd` is an open socket owned by this function.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_FASTOPEN,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let sent = usize::try_from(sent).map_err(|_| std::io::Error::last_os_error())?;
    let mut stream = TcpStream::from(fd);
    stream.write_all(&data[sent..])?;
    Ok((stream, sent))
}

/// A TCP/IPv4 socket set up as `options` say, not yet connected.
fn socket_v4(options: DialOptions) -> Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )?;
    if let Some(mark) = options.mark {
        setsockopt(&fd, sockopt::Mark, &mark)?;
    }
    if let Some(local) = options.local {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        bind(fd.as_raw_fd(), &SockaddrIn::from(local))?;
    }
    Ok(fd)
}

/// A connection from the runner's fixed source `port` (call it inside the
/// runner's namespace).
pub fn dial_from_runner_port(port: u16, target: SocketAddr) -> Result<TcpStream> {
    let local = SocketAddrV4::new(RUNNER_V4, port);
    dial_v4(
        target,
        DialOptions {
            mark: None,
            local: Some(local),
        },
    )
}

/// A target on `port` that echoes three bytes and closes first, so the
/// runner keeps no TIME_WAIT and can reuse its port at once.
pub fn three_byte_echo(fx: &AuthFixture, port: u16) -> Result<crate::AcceptLoop<()>> {
    three_byte_echoes(fx, port, 64)
}

/// [`three_byte_echo`] for up to `connections`.
pub fn three_byte_echoes(
    fx: &AuthFixture,
    port: u16,
    connections: usize,
) -> Result<crate::AcceptLoop<()>> {
    use std::io::Write;
    crate::accept_loop(
        &fx.topo.target,
        AuthFixture::target(port),
        connections,
        |mut s, _| {
            let mut b = [0u8; 3];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        },
    )
    .map_err(Into::into)
}

/// Sends `message` to a [`three_byte_echo`] target; checks its echo and
/// its close (a FIN, nothing more).
pub fn echo_three(stream: &mut TcpStream, message: &[u8; 3]) -> Result<()> {
    use std::io::Write;
    stream.write_all(message)?;
    let mut back = [0u8; 3];
    stream.read_exact(&mut back)?;
    anyhow::ensure!(&back == message, "echo of {message:?}: {back:?}");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    anyhow::ensure!(rest.is_empty(), "the target's close, not {rest:?}");
    Ok(())
}

/// The flow watch's rounds so far (`tcpgate_routed_polls_total`).
pub fn routed_polls(fx: &AuthFixture) -> Result<f64> {
    let metrics = crate::metrics::parse(&crate::metrics::scrape_unix(&fx.admin_socket())?)?;
    Ok(metrics.count("tcpgate_routed_polls_total", &[]))
}

/// Waits until the flow watch has polled twice more: the second poll
/// began after this call, so it took in whatever happened before it.
pub fn wait_whole_poll(fx: &AuthFixture) -> Result<()> {
    let start = routed_polls(fx)?;
    crate::eventually(Duration::from_secs(30), "two more routed polls", || {
        routed_polls(fx).map(|now| now >= start + 2.0)
    })
}

/// [`dial_from_runner_port`], waiting (bounded) while the port's previous
/// connection still waits for the target's last ACK (`LAST_ACK` holds the
/// 4-tuple: `EADDRNOTAVAIL`).
pub fn redial_from_runner_port(
    fx: &AuthFixture,
    port: u16,
    target: SocketAddr,
) -> Result<TcpStream> {
    crate::eventually(
        Duration::from_secs(10),
        "the runner's source port to be free",
        || match fx
            .topo
            .runner
            .run(move || dial_from_runner_port(port, target))
        {
            Ok(stream) => Ok(Some(stream)),
            Err(e) if port_busy(&e) => Ok(None),
            Err(e) => Err(e),
        },
    )
}

fn port_busy(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::AddrNotAvailable | ErrorKind::AddrInUse
            )
        }) || cause
            .downcast_ref::<nix::errno::Errno>()
            .is_some_and(|errno| {
                matches!(
                    errno,
                    nix::errno::Errno::EADDRNOTAVAIL | nix::errno::Errno::EADDRINUSE
                )
            })
    })
}

/// A target on `port` for one connection: it sends `up`, then reads to
/// the end and reports whether that end was a reset.
pub fn up_then_wait_for_reset(fx: &AuthFixture, port: u16) -> Result<crate::OneShot<bool>> {
    use std::io::Write;
    crate::serve_once(&fx.topo.target, AuthFixture::target(port), |mut s, _| {
        let _ = s.write_all(b"up");
        ends_in_reset(&mut s)
    })
    .map_err(Into::into)
}

/// Both ends of a routed connection see the agent's RSTs: the runner's
/// `stream` and the [`up_then_wait_for_reset`] target. `when` names the
/// moment for the message; the agent's log says whether it sent them.
pub fn ensure_reset_both_ends(
    fx: &AuthFixture,
    stream: &mut TcpStream,
    target: crate::OneShot<bool>,
    when: &str,
) -> Result<()> {
    anyhow::ensure!(
        ends_in_reset(stream),
        "{when}: the runner sees an RST\n{}",
        fx.agent.logs_tail(20)
    );
    anyhow::ensure!(
        target.join()?,
        "{when}: the target sees an RST\n{}",
        fx.agent.logs_tail(20)
    );
    Ok(())
}

/// One routed connection to a target on `port` that reads to the
/// runner's FIN and then answers (a half-close): `up` one way, `down` the
/// other, each checked by length and SHA-256. Returns the address the
/// target saw.
pub fn exchange_half_closed(
    fx: &AuthFixture,
    port: u16,
    up: crate::Payload,
    down: crate::Payload,
) -> Result<SocketAddr> {
    let server = crate::serve_once(
        &fx.topo.target,
        AuthFixture::target(port),
        move |mut s, peer| {
            let got = crate::read_to_end_hashed(&mut s)?;
            crate::write_payload(&mut s, &down)?;
            std::io::Result::Ok((got, peer))
        },
    )?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(port))?;
    let sent = crate::write_payload(&mut stream, &up)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let (n, got) = crate::read_to_end_hashed(&mut stream)?;
    let ((server_n, server_got), peer) = server.join()??;
    anyhow::ensure!(
        server_n == up.len && server_got == sent,
        "up: {server_n} bytes"
    );
    anyhow::ensure!(n == down.len && got == down.digest(), "down: {n} bytes");
    Ok(peer)
}
