//! Routed grants (`[intercept.routed_grants]`): the fixture and the checks
//! the routed suites share.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};

use anyhow::Result;

use crate::auth_fixture::{AuthFixture, Launch, policy};
use crate::topology::BASTION_RUNNER_IF;

/// An agent with routed grants on the runner-facing interface, flows
/// lingering 300 ms after they end; `extra` adds lines to the section.
pub fn routed_fixture(extra: &str) -> Result<AuthFixture> {
    AuthFixture::start_launched(&policy("15m"), &[], routed_launch(extra))
}

/// [`routed_fixture`]'s launch, for callers that add to it.
pub fn routed_launch(extra: &str) -> Launch {
    Launch {
        intercept_extra: format!("interfaces = [{BASTION_RUNNER_IF:?}]"),
        sections: format!(
            "\n[intercept.routed_grants]\nenabled = true\nlinger = \"300ms\"\n{extra}"
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
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(v4) = target else {
        anyhow::bail!("IPv4 only")
    };
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
    connect(fd.as_raw_fd(), &SockaddrIn::from(v4))?;
    Ok(TcpStream::from(fd))
}
