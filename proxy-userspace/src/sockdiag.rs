//! Ending TCP sockets from outside their owner: `NETLINK_SOCK_DIAG` dumps
//! every TCP socket of this network namespace with its cookie, and
//! `SOCK_DESTROY` aborts one by its exact 4-tuple (the kernel checks the
//! cookie too, so a reused 4-tuple is never hit). Needs `CAP_NET_ADMIN` and
//! a kernel with `CONFIG_INET_DIAG_DESTROY`; the peer gets a RST and the
//! owner sees `ECONNABORTED`, as with `ss -K`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDR_LEN: usize = 16;
const REQ_LEN: usize = 56;
/// `inet_diag_msg`: family, state, timer, retrans, then the socket id.
const MSG_ID_OFFSET: usize = 4;
const SOCKID_LEN: usize = 48;
const ALL_STATES: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket")]
    Socket(#[source] io::Error),
    #[error("netlink request failed")]
    Io(#[source] io::Error),
    #[error(
        "the kernel refused SOCK_DESTROY: {0} (needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY)"
    )]
    Destroy(#[source] io::Error),
    #[error("malformed netlink answer: {0}")]
    Malformed(&'static str),
}

/// A TCP socket as `inet_diag` names it: family and the raw
/// `inet_diag_sockid` (ports, addresses, interface, cookie).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    pub family: u8,
    sockid: [u8; SOCKID_LEN],
}

impl DiagSocket {
    /// The socket cookie (`SO_COOKIE`).
    #[must_use]
    pub fn cookie(&self) -> u64 {
        let low = u32::from_ne_bytes([
            self.sockid[40],
            self.sockid[41],
            self.sockid[42],
            self.sockid[43],
        ]);
        let high = u32::from_ne_bytes([
            self.sockid[44],
            self.sockid[45],
            self.sockid[46],
            self.sockid[47],
        ]);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Local and remote `ip:port`, for reports.
    #[must_use]
    pub fn describe(&self) -> String {
        format!("{} -> {}", self.local(), self.remote())
    }

    /// The local `ip:port` (an IPv4-mapped address as IPv4).
    #[must_use]
    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(self.addr(4), self.port(0))
    }

    /// The remote `ip:port` (an IPv4-mapped address as IPv4).
    #[must_use]
    pub fn remote(&self) -> SocketAddr {
        SocketAddr::new(self.addr(20), self.port(2))
    }

    fn port(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.sockid[at], self.sockid[at + 1]])
    }

    fn addr(&self, at: usize) -> IpAddr {
        let bytes = &self.sockid[at..at + 16];
        if i32::from(self.family) == libc::AF_INET {
            Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
        } else {
            let mut v6 = [0u8; 16];
            v6.copy_from_slice(bytes);
            IpAddr::from(v6).to_canonical()
        }
    }
}

fn open() -> Result<OwnedFd, SockDiagError> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(|e| SockDiagError::Socket(e.into()))
}

fn request(kind: u16, flags: u16, family: u8, sockid: &[u8; SOCKID_LEN], seq: u32) -> Vec<u8> {
    let total = NLMSG_HDR_LEN + REQ_LEN;
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states, id.
    msg.extend_from_slice(&[family, u8::try_from(libc::IPPROTO_TCP).unwrap_or(6), 0, 0]);
    msg.extend_from_slice(&ALL_STATES.to_ne_bytes());
    msg.extend_from_slice(sockid);
    msg
}

fn send(fd: &OwnedFd, msg: &[u8]) -> Result<(), SockDiagError> {
    sendto(
        fd.as_raw_fd(),
        msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map(drop)
    .map_err(|e| SockDiagError::Io(e.into()))
}

/// One netlink message: (type, payload).
fn messages(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, SockDiagError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDR_LEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < NLMSG_HDR_LEN || at + len > buf.len() {
            return Err(SockDiagError::Malformed("message length"));
        }
        out.push((kind, &buf[at + NLMSG_HDR_LEN..at + len]));
        at += (len + 3) & !3;
    }
    Ok(out)
}

fn error_code(payload: &[u8]) -> Result<i32, SockDiagError> {
    let bytes: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(SockDiagError::Malformed("short error message"))?;
    Ok(i32::from_ne_bytes(bytes))
}

/// Every TCP socket (IPv4 and IPv6, all states) in this network namespace.
pub fn tcp_sockets() -> Result<Vec<DiagSocket>, SockDiagError> {
    let fd = open()?;
    let mut sockets = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let family = u8::try_from(family).unwrap_or(0);
        send(
            &fd,
            &request(
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST | NLM_F_DUMP,
                family,
                &[0; SOCKID_LEN],
                1,
            ),
        )?;
        let mut buf = vec![0u8; 64 * 1024];
        'dump: loop {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| SockDiagError::Io(e.into()))?;
            for (kind, payload) in messages(&buf[..n])? {
                match kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => {
                        let code = error_code(payload)?;
                        return Err(SockDiagError::Io(io::Error::from_raw_os_error(-code)));
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        let id = payload
                            .get(MSG_ID_OFFSET..MSG_ID_OFFSET + SOCKID_LEN)
                            .ok_or(SockDiagError::Malformed("short inet_diag_msg"))?;
                        let mut sockid = [0u8; SOCKID_LEN];
                        sockid.copy_from_slice(id);
                        sockets.push(DiagSocket {
                            family: payload[0],
                            sockid,
                        });
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(sockets)
}

/// Aborts one socket (RST to its peer, `ECONNABORTED` to its owner).
pub fn destroy(socket: &DiagSocket) -> Result<(), SockDiagError> {
    let fd = open()?;
    send(
        &fd,
        &request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            socket.family,
            &socket.sockid,
            2,
        ),
    )?;
    let mut buf = vec![0u8; 4096];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(|e| SockDiagError::Io(e.into()))?;
    for (kind, payload) in messages(&buf[..n])? {
        if kind == NLMSG_ERROR {
            return match error_code(payload)? {
                0 => Ok(()),
                code => Err(SockDiagError::Destroy(io::Error::from_raw_os_error(-code))),
            };
        }
    }
    Err(SockDiagError::Malformed("no acknowledgement"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_its_own_socket_by_cookie() {
        // Dumping needs no privilege: a loopback pair of this process shows
        // up with the cookie SO_COOKIE reports.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let cookie = crate::sockopt::cookie(std::os::fd::AsFd::as_fd(&client)).expect("cookie");
        let sockets = tcp_sockets().expect("dump");
        let found = sockets
            .iter()
            .find(|s| s.cookie() == cookie)
            .expect("own socket in the dump");
        let local = client.local_addr().expect("local");
        assert_eq!(
            found.describe(),
            format!("{local} -> {}", listener.local_addr().expect("addr"))
        );
    }

    /// `tcpgate revoke` finds a copied session's client socket by its
    /// addresses: the accepted socket's local and remote ends, IPv4 and
    /// IPv4 mapped into a dual-stack listener's IPv6 alike.
    #[test]
    fn finds_an_accepted_socket_by_its_addresses() {
        for (listen, dial) in [("127.0.0.1:0", "127.0.0.1"), ("[::]:0", "127.0.0.1")] {
            let Ok(listener) = std::net::TcpListener::bind(listen) else {
                continue; // no IPv6 here
            };
            let port = listener.local_addr().expect("addr").port();
            let client = std::net::TcpStream::connect((dial, port)).expect("connect");
            // The dual-stack listener sees the peer as `::ffff:127.0.0.1`;
            // the dump gives it as IPv4, as the session record does.
            let (accepted, _) = listener.accept().expect("accept");
            let wanted = (
                client.peer_addr().expect("peer"),
                client.local_addr().expect("local"),
            );
            let cookie =
                crate::sockopt::cookie(std::os::fd::AsFd::as_fd(&accepted)).expect("cookie");
            let found: Vec<_> = tcp_sockets()
                .expect("dump")
                .into_iter()
                .filter(|s| (s.local(), s.remote()) == wanted)
                .collect();
            assert_eq!(found.len(), 1, "{listen}: {found:?}");
            assert_eq!(found[0].cookie(), cookie, "{listen}");
        }
    }
}
