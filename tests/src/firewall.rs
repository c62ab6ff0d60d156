//! Probes for the guard table: does a packet get from one namespace to a
//! protected address? Every probe is bounded; "not reached" means nothing
//! arrived within [`PROBE_WAIT`].
//!
//! The nftables tables the agent makes live in the test's bastion
//! namespace, so they go with it (`Netns` drop), also when a test fails.

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::Netns;
use anyhow::{Context, Result};

/// How long a probe waits for an answer that a dropped packet never gets.
pub const PROBE_WAIT: Duration = Duration::from_secs(2);

/// The nftables tables in `ns`, by name, sorted.
pub fn tables(ns: &Netns) -> Result<Vec<String>> {
    let text = ns.exec_ok(&["nft", "list", "tables"])?;
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

/// A TCP connection from `ns` to `addr` completes within [`PROBE_WAIT`]
/// (false for a refusal or a drop).
pub fn tcp_reaches(ns: &Netns, addr: SocketAddr) -> Result<bool> {
    Ok(ns
        .try_run(move || TcpStream::connect_timeout(&addr, PROBE_WAIT))?
        .is_ok())
}

/// A UDP receiver in the target namespace that counts datagrams.
pub struct UdpSink {
    socket: UdpSocket,
    pub addr: SocketAddr,
}

impl UdpSink {
    pub fn bind(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let socket = ns.try_run(move || UdpSocket::bind(addr))??;
        socket.set_read_timeout(Some(PROBE_WAIT))?;
        Ok(Self { socket, addr })
    }

    /// Sends `tag` from `from` and says whether this sink received it
    /// within [`PROBE_WAIT`].
    pub fn reached_from(&self, from: &Netns, tag: &str) -> Result<bool> {
        let (to, payload) = (self.addr, tag.as_bytes().to_vec());
        let sent = from.try_run(move || -> std::io::Result<()> {
            let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
            UdpSocket::bind(unspecified)?
                .send_to(&payload, to)
                .map(drop)
        })?;
        match sent {
            Ok(()) => {}
            // Dropped on the sender's own output hook.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(false),
            Err(e) => return Err(e).context("udp send"),
        }
        // Anything else is an earlier probe's datagram, late.
        received(&self.socket, |datagram, _| datagram == tag.as_bytes())
    }
}

/// Reads datagrams from `socket` (its read timeout set) until one
/// satisfies `wanted` (true), or [`PROBE_WAIT`] passes (false).
fn received(socket: &UdpSocket, wanted: impl Fn(&[u8], SocketAddr) -> bool) -> Result<bool> {
    let deadline = Instant::now() + PROBE_WAIT;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if wanted(&buf[..n], from) => return Ok(true),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e).context("receive"),
        }
    }
    Ok(false)
}

/// One ICMP echo from `ns` to `target` is answered within [`PROBE_WAIT`]
/// (a raw socket: no ping binary needed).
pub fn ping(ns: &Netns, target: Ipv4Addr) -> Result<bool> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    let socket = ns.try_run(|| {
        socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        )
    })??;
    // sendto/recvfrom on a raw socket are the datagram calls UdpSocket makes.
    let socket = UdpSocket::from(socket);
    socket.set_read_timeout(Some(PROBE_WAIT))?;
    let id: u16 = 0x7467;
    let mut echo = vec![8u8, 0, 0, 0, id.to_be_bytes()[0], id.to_be_bytes()[1], 0, 1];
    echo.extend_from_slice(b"tcpgate-guard-probe");
    let sum = checksum(&echo);
    echo[2..4].copy_from_slice(&sum.to_be_bytes());
    socket.send_to(&echo, SocketAddr::new(target.into(), 0))?;
    received(&socket, |packet, from| {
        // Raw IPv4 sockets deliver the IP header too.
        let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
        let reply = packet.get(ihl..).unwrap_or_default();
        from.ip() == target
            && reply.first() == Some(&0)
            && reply.get(4..6) == Some(&id.to_be_bytes())
    })
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
