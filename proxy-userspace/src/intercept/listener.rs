//! The transparent listeners the sk_lookup program steers SYNs to.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;

use tokio::net::{TcpListener, TcpSocket};

use crate::sockopt;

/// Accept backlog: SYN floods must not starve real clients too early.
const BACKLOG: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot create transparent listener on {addr}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set IP_TRANSPARENT on {addr} (needs CAP_NET_ADMIN)")]
    Transparent {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds a listener that accepts connections for non-local destinations.
pub fn transparent(addr: SocketAddr) -> Result<TcpListener, ListenerError> {
    let socket_err = |source| ListenerError::Socket { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(socket_err)?;
    socket.set_reuseaddr(true).map_err(socket_err)?;
    if addr.is_ipv6() {
        nix::sys::socket::setsockopt(
            &socket.as_fd(),
            nix::sys::socket::sockopt::Ipv6V6Only,
            &true,
        )
        .map_err(|e| socket_err(e.into()))?;
    }
    sockopt::set_transparent(socket.as_fd(), addr.is_ipv6())
        .map_err(|source| ListenerError::Transparent { addr, source })?;
    socket.bind(addr).map_err(socket_err)?;
    socket.listen(BACKLOG).map_err(socket_err)
}

/// A transparent listener a predecessor handed over, already bound and
/// listening at `addr`.
pub fn adopt(
    listener: std::net::TcpListener,
    addr: SocketAddr,
) -> Result<TcpListener, ListenerError> {
    let socket_err = |source| ListenerError::Socket { addr, source };
    listener.set_nonblocking(true).map_err(socket_err)?;
    TcpListener::from_std(listener).map_err(socket_err)
}

/// The IPv4 and IPv6 listener addresses for `port`.
#[must_use]
pub fn addresses(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ]
}
