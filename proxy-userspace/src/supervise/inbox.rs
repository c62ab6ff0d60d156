//! The supervisor's own notify socket: its children's `NOTIFY_SOCKET`. An
//! abstract datagram socket with SO_PASSCRED, so each message carries the
//! sender's pid as the kernel saw it; the supervisor relays only its own
//! children's messages (anyone in the network namespace can send to an
//! abstract name, but no one can forge the pid).

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// sd_notify messages are a few short lines; longer ones are dropped.
const MAX_MESSAGE: usize = 4096;

pub struct Inbox {
    socket: UnixDatagram,
    name: String,
}

/// One received message and the pid that sent it.
pub struct Received {
    pub pid: Option<u32>,
    pub message: Option<String>,
}

impl Inbox {
    /// Binds `@tcpgate-supervise-<pid>-<random>`. The random part keeps
    /// another local user from binding the name first (abstract names
    /// have no owner) and so keeping the supervisor from starting; a name
    /// taken anyway is drawn again.
    pub fn bind() -> io::Result<Self> {
        let mut tries = 0;
        let (socket, name) = loop {
            let name = format!(
                "tcpgate-supervise-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            );
            let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
            match std::os::unix::net::UnixDatagram::bind_addr(&addr) {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 8 => tries += 1,
                bound => break (bound?, name),
            }
        };
        setsockopt(&socket, sockopt::PassCred, &true).map_err(io::Error::from)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket: UnixDatagram::from_std(socket)?,
            name,
        })
    }

    /// The value of the children's `NOTIFY_SOCKET`.
    pub fn address(&self) -> String {
        format!("@{}", self.name)
    }

    /// The next message; `message` is `None` when it was truncated or not
    /// UTF-8.
    pub async fn recv(&self) -> io::Result<Received> {
        loop {
            self.socket.readable().await?;
            match self
                .socket
                .try_io(Interest::READABLE, || receive(&self.socket))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
        }
    }
}

fn receive(socket: &UnixDatagram) -> io::Result<Received> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!(libc::ucred);
    let (len, pid, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            socket.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let pid = msg.cmsgs().map_err(io::Error::from)?.find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(cred) => u32::try_from(cred.pid()).ok(),
            _ => None,
        });
        (
            msg.bytes,
            pid,
            msg.flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
        )
    };
    let message = if truncated {
        None
    } else {
        std::str::from_utf8(&buf[..len]).ok().map(str::to_owned)
    };
    Ok(Received { pid, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_comes_with_the_senders_pid() {
        let inbox = Inbox::bind().expect("bind");
        let addr = SocketAddr::from_abstract_name(&inbox.address().as_bytes()[1..]).expect("addr");
        let sender = std::os::unix::net::UnixDatagram::unbound().expect("socket");
        sender
            .send_to_addr(b"READY=1\nSTATUS=up", &addr)
            .expect("send");
        let received = inbox.recv().await.expect("recv");
        assert_eq!(received.pid, Some(std::process::id()));
        assert_eq!(received.message.as_deref(), Some("READY=1\nSTATUS=up"));
    }

    #[tokio::test]
    async fn a_name_bound_first_by_someone_else_does_not_stop_the_inbox() {
        // The name a pid alone would give, and the same pid's name twice.
        let squatted = format!("tcpgate-supervise-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(squatted.as_bytes()).expect("addr");
        let _squatter = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("squat");
        let first = Inbox::bind().expect("bind");
        let second = Inbox::bind().expect("bind again");
        assert_ne!(first.address(), format!("@{squatted}"));
        assert_ne!(first.address(), second.address());
    }
}
