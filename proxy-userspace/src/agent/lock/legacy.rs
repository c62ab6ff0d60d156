//! The namespace lock of agents built before the lock files: the abstract
//! unix name `@tcpgate-agent`, bound for the agent's lifetime. An older
//! agent still running in the namespace (started by hand beside a newer
//! one, say) owns it, so a newer agent must not start beside it. A socket
//! on that name held by any other user is ignored: binding it was how any
//! local user could keep the agent from starting.

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket,
    sockopt::PeerCredentials,
};

const ABSTRACT_NAME: &[u8] = b"tcpgate-agent";

/// The pid of an older agent holding the abstract name, if one runs as
/// root, this agent's user or the service account and is not exiting.
pub fn holder() -> Option<i32> {
    let addr = UnixAddr::new_abstract(ABSTRACT_NAME).ok()?;
    // Non-blocking: a holder that never accepts (a full backlog) answers
    // EAGAIN instead of stalling the start.
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    connect(fd.as_raw_fd(), &addr).ok()?;
    let cred = getsockopt(&fd, PeerCredentials).ok()?;
    let uid = cred.uid();
    let pid = cred.pid();
    (super::file::trusted_owner(uid) && !super::exiting(pid)).then_some(pid)
}

/// Binds the abstract name too, when free, so an older agent started
/// beside this one finds the namespace taken (it knows only the name).
/// Best effort: another user's socket on it is not this agent's concern.
pub fn bind() -> Option<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(ABSTRACT_NAME).ok()?;
    std::os::unix::net::UnixListener::bind_addr(&addr).ok()
}
