//! The TCP connections another process holds, read through copies of its
//! descriptors (`pidfd_getfd`, as root): which peer each talks to, and
//! whether it sends at once (`TCP_NODELAY`).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One connected TCP socket of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldConnection {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub nodelay: bool,
}

fn syscall_fd(result: libc::c_long) -> io::Result<OwnedFd> {
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(result).map_err(|_| io::ErrorKind::InvalidData)?;
    // SAFETY: a descriptor the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Every connected TCP socket `pid` holds now (listeners, Unix sockets
/// and descriptors closed meanwhile are left out).
pub fn held_connections(pid: u32) -> io::Result<Vec<HeldConnection>> {
    let pid_arg = libc::pid_t::try_from(pid).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let pidfd = syscall_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid_arg, 0) })?;
    let mut held = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: pidfd_getfd copies descriptor `fd` of the process behind
        // `pidfd` into this one, as a new descriptor we own.
        let copied = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        let Ok(copy) = syscall_fd(copied) else {
            continue; // closed since the listing
        };
        let stream = TcpStream::from(copy);
        let (Ok(local), Ok(peer), Ok(nodelay)) =
            (stream.local_addr(), stream.peer_addr(), stream.nodelay())
        else {
            continue; // not a connected TCP socket
        };
        held.push(HeldConnection {
            local,
            peer,
            nodelay,
        });
    }
    Ok(held)
}
