//! Thin, checked wrappers over the socket options and ioctls the agent needs.
//! Each takes a borrowed fd so callers cannot outlive the socket.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

fn getsockopt_raw<T: Copy>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: &mut T,
) -> io::Result<()> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` points to a live, writable T and `len` is its size; the
    // kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setsockopt_raw<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The socket's cookie (`SO_COOKIE`): stable for its lifetime, and what the
/// eBPF programs see from `bpf_get_socket_cookie`.
pub fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_COOKIE, &mut value)?;
    Ok(value)
}

/// What a socket has sent: acknowledged by the peer, and still queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendState {
    /// `tcpi_bytes_acked`.
    pub acked: u64,
    /// `SIOCOUTQ`: written but not yet acknowledged.
    pub queued: u64,
    /// `tcpi_state` (`TCP_ESTABLISHED` = 1, ...), from the same read.
    pub tcp_state: u8,
}

impl SendState {
    /// Bytes handed to TCP so far. Compared against a baseline taken before
    /// splicing, it tells how much a redirect has really reached the socket.
    #[must_use]
    pub const fn handed_to_tcp(self) -> u64 {
        self.acked + self.queued
    }
}

/// What the socket has sent, from `TCP_INFO` and `SIOCOUTQ`.
///
/// Two reads, `TCP_INFO` then `SIOCOUTQ`: an acknowledgement processed
/// between them (on another CPU) moves bytes out of the queue after the
/// acknowledged count was read, so the sum can fall short, never exceed.
/// Fine for a figure compared against later ones (it only waits longer);
/// a baseline wants [`settled_send_state`].
pub fn send_state(fd: BorrowedFd<'_>) -> io::Result<SendState> {
    let info = tcp_info(fd)?;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int to the pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SendState {
        acked: info.tcpi_bytes_acked,
        queued: u64::try_from(queued).unwrap_or(0),
        tcp_state: info.tcpi_state,
    })
}

/// How often [`settled_send_state`] reads again before giving up.
const SETTLE_TRIES: usize = 16;

/// [`send_state`] with both halves from the same moment: the queue is read
/// between two `TCP_INFO` reads that agree on the acknowledged count, so no
/// acknowledgement moved bytes between the reads. Only the socket's own
/// writer adds to the queue, and a baseline is taken while nothing writes.
/// A baseline that fell short would let a drain barrier pass before the
/// peer holds every byte, and the shutdown would then cut them off.
pub fn settled_send_state(fd: BorrowedFd<'_>) -> io::Result<SendState> {
    let mut state = send_state(fd)?;
    for _ in 0..SETTLE_TRIES {
        let acked = tcp_info(fd)?.tcpi_bytes_acked;
        if acked == state.acked {
            return Ok(state);
        }
        state = send_state(fd)?;
    }
    Err(io::Error::other(format!(
        "acknowledgements kept arriving over {SETTLE_TRIES} reads of the send state"
    )))
}

/// `tcpi_bytes_acked + SIOCOUTQ`: see [`SendState::handed_to_tcp`].
pub fn bytes_sent(fd: BorrowedFd<'_>) -> io::Result<u64> {
    send_state(fd).map(SendState::handed_to_tcp)
}

/// Bytes waiting in the socket's receive queue (`SIOCINQ`).
pub fn queued_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCINQ (FIONREAD) writes one c_int to the pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Raises the open-files soft limit to the hard limit: every session holds
/// two sockets, and the usual soft limit of 1024 caps the agent near 500.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit to the pointer we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads one rlimit from the pointer we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// TCP state from `TCP_INFO` (`TCP_ESTABLISHED` = 1, ...).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    tcp_info(fd).map(|info| info.tcpi_state)
}

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    Ok(info)
}

/// Sets `SO_RCVLOWAT`. Setting it also re-evaluates the socket's readiness
/// and calls its data-ready callback when data is queued, which is how bytes
/// that arrived before the socket joined the SOCKHASH reach the verdict.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, &bytes)
}

/// Marks the socket's packets (`SO_MARK`) so policy routing can exempt the
/// agent's own upstream connections from interception.
pub fn set_mark(fd: BorrowedFd<'_>, mark: u32) -> io::Result<()> {
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_MARK, &mark)
}

/// Lets a listener accept connections for non-local destinations
/// (`IP_TRANSPARENT` / `IPV6_TRANSPARENT`).
pub fn set_transparent(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    if ipv6 {
        setsockopt_raw(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, &on)
    } else {
        setsockopt_raw(fd, libc::SOL_IP, libc::IP_TRANSPARENT, &on)
    }
}

/// Bounds how long a stalled or vanished peer can hold the session:
/// `TCP_USER_TIMEOUT` aborts the connection when sent data stays
/// unacknowledged (zero-window probes included) for `timeout`, and
/// keepalive probes catch a peer that vanished while the session was idle.
pub fn set_stall_timeout(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    let millis = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, &millis)?;
    let idle = libc::c_int::try_from(timeout.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    let interval = (idle / 3).max(1);
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, &1 as &libc::c_int)?;
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, &idle)?;
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, &interval)?;
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, &3 as &libc::c_int)
}

/// Turns off Nagle's algorithm (`TCP_NODELAY`). A relay writes whatever
/// arrived: with Nagle on, a write shorter than a segment waits until the
/// peer acknowledges everything sent before, and a peer delaying its ACK
/// (up to 40 ms) then stalls request/response traffic that needs no such
/// wait end to end. Accepted sockets inherit it from their listener.
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &1 as &libc::c_int)
}

/// Forces the send buffer size (`SO_SNDBUFFORCE`, needs CAP_NET_ADMIN),
/// bypassing `net.core.wmem_max`.
pub fn force_sndbuf(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &bytes)
}

/// Makes the next `close()` send a RST instead of a FIN, so the peer learns
/// at once that the stream did not end cleanly.
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

/// The pending socket error (`SO_ERROR`), if any.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let mut value: libc::c_int = 0;
    getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_ERROR, &mut value)?;
    Ok((value != 0).then(|| io::Error::from_raw_os_error(value)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn accepted_sockets_inherit_stall_bounds_from_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        set_stall_timeout(listener.as_fd(), std::time::Duration::from_secs(9)).expect("set");
        let _client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let mut user_timeout: libc::c_uint = 0;
        getsockopt_raw(
            server.as_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            &mut user_timeout,
        )
        .expect("get");
        assert_eq!(user_timeout, 9000);
        let mut keepalive: libc::c_int = 0;
        getsockopt_raw(
            server.as_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            &mut keepalive,
        )
        .expect("get");
        assert_eq!(keepalive, 1);
        let mut idle: libc::c_int = 0;
        getsockopt_raw(
            server.as_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            &mut idle,
        )
        .expect("get");
        assert_eq!(idle, 9);
    }

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let nodelay = |fd| {
            let mut value: libc::c_int = 0;
            getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &mut value).expect("get");
            value
        };
        let plain = TcpListener::bind("127.0.0.1:0").expect("bind");
        let _first = TcpStream::connect(plain.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = plain.accept().expect("accept");
        assert_eq!(nodelay(accepted.as_fd()), 0, "Nagle is on by default");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        set_nodelay(listener.as_fd()).expect("set");
        let _client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        assert_eq!(nodelay(server.as_fd()), 1);
    }

    #[test]
    fn cookies_differ_and_bytes_sent_counts_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let (a, b) = (
            cookie(client.as_fd()).expect("cookie"),
            cookie(server.as_fd()).expect("cookie"),
        );
        assert_ne!(a, 0);
        assert_ne!(a, b);
        let before = bytes_sent(client.as_fd()).expect("bytes_sent");
        client.write_all(&[7u8; 1000]).expect("write");
        let after = bytes_sent(client.as_fd()).expect("bytes_sent");
        assert_eq!(after - before, 1000);
        let settled = settled_send_state(client.as_fd()).expect("settled");
        assert_eq!(settled.handed_to_tcp() - before, 1000);
        assert_eq!(tcp_state(server.as_fd()).expect("state"), 1);
    }
}
