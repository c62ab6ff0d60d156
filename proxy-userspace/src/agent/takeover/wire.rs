//! The takeover socket's framing: a big-endian u32 length, then a JSON
//! message; descriptors ride along with a message's first byte
//! (SCM_RIGHTS), so they arrive with the header read.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use super::{Message, TakeoverError};

/// Largest message accepted: the handed-over state is a few records per
/// grant, far below this even at the grant limit.
const MAX_MESSAGE: usize = 64 << 20;
/// Most descriptors one message carries (every listener of an agent).
pub const MAX_FDS: usize = 64;

pub fn send(
    stream: &UnixStream,
    message: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), TakeoverError> {
    send_fds(stream, message, fds).map_err(|failed| failed.error)
}

/// A send that failed, and whether its descriptors reached the peer
/// anyway (they ride with the first byte).
#[derive(Debug)]
pub struct SendFailed {
    pub error: TakeoverError,
    pub delivered: bool,
}

/// Like [`send`], telling whether the descriptors went when it fails.
pub fn send_fds(
    stream: &UnixStream,
    message: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), SendFailed> {
    let undelivered = |error| SendFailed {
        error,
        delivered: false,
    };
    let frame = frame(message).map_err(undelivered)?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(
        stream.as_fd().as_raw_fd(),
        &[IoSlice::new(&frame)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| undelivered(io_error(e.into())))?;
    (&*stream)
        .write_all(&frame[sent..])
        .map_err(|e| SendFailed {
            error: io_error(e),
            delivered: true,
        })
}

/// A message's frame: its length, then its JSON.
pub fn frame(message: &Message) -> Result<Vec<u8>, TakeoverError> {
    let body = serde_json::to_vec(message).map_err(TakeoverError::Malformed)?;
    let len = u32::try_from(body.len()).map_err(|_| TakeoverError::TooLarge(body.len()))?;
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The body length a header announces, if it is not too large.
pub fn checked_len(header: [u8; 4]) -> Result<usize, TakeoverError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_MESSAGE {
        return Err(TakeoverError::TooLarge(len));
    }
    Ok(len)
}

pub fn recv(stream: &UnixStream) -> Result<(Message, Vec<OwnedFd>), TakeoverError> {
    let mut header = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (read, fds) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = recvmsg::<()>(
            stream.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| io_error(e.into()))?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(|e| io_error(e.into()))? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process just now; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(TakeoverError::TooManyFds);
        }
        (msg.bytes, fds)
    };
    if read == 0 {
        return Err(TakeoverError::Closed);
    }
    (&*stream)
        .read_exact(&mut header[read..])
        .map_err(io_error)?;
    let len = checked_len(header)?;
    let mut body = vec![0u8; len];
    (&*stream).read_exact(&mut body).map_err(io_error)?;
    let message = serde_json::from_slice(&body).map_err(TakeoverError::Malformed)?;
    Ok((message, fds))
}

/// A read or write timeout (SO_RCVTIMEO/SO_SNDTIMEO) is the other agent
/// not answering; end of file is it closing the connection.
pub fn io_error(e: std::io::Error) -> TakeoverError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => TakeoverError::Timeout,
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionReset => TakeoverError::Closed,
        _ => TakeoverError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::takeover::{ListenerInfo, ListenerRole};

    #[test]
    fn a_message_and_its_descriptors_arrive_together() {
        let (a, b) = UnixStream::pair().expect("pair");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let message = Message::Offer {
            state_version: 7,
            pid: 1,
            listeners: vec![ListenerInfo {
                role: ListenerRole::Forward,
                addr,
            }],
            state: super::super::HandedState::default(),
        };
        send(&a, &message, &[listener.as_fd()]).expect("send");
        let (got, fds) = recv(&b).expect("recv");
        assert!(matches!(
            got,
            Message::Offer {
                state_version: 7,
                ..
            }
        ));
        assert_eq!(fds.len(), 1);
        let received = std::net::TcpListener::from(fds.into_iter().next().expect("fd"));
        // The same listening socket: a connection to it queues on both.
        assert_eq!(received.local_addr().expect("local addr"), addr);
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        drop(listener);
        assert!(received.accept().is_ok());
    }

    #[test]
    fn a_closed_peer_and_a_garbled_frame_are_errors_not_panics() {
        let (a, b) = UnixStream::pair().expect("pair");
        drop(a);
        assert!(matches!(recv(&b), Err(TakeoverError::Closed)));
        let (a, b) = UnixStream::pair().expect("pair");
        (&a).write_all(&[0, 0, 0, 3, b'{', b'x', b'}'])
            .expect("write");
        assert!(matches!(recv(&b), Err(TakeoverError::Malformed(_))));
        let (a, b) = UnixStream::pair().expect("pair");
        (&a).write_all(&[0xff, 0xff, 0xff, 0xff]).expect("write");
        assert!(matches!(recv(&b), Err(TakeoverError::TooLarge(_))));
    }

    #[test]
    fn taken_without_adopt_reads_as_a_version_1_agent_wrote_it() {
        let plain = serde_json::to_string(&Message::Taken { adopt: false }).expect("json");
        assert_eq!(plain, r#"{"type":"taken"}"#, "a version 1 agent reads it");
        let asked: Message =
            serde_json::from_str(r#"{"type":"taken","adopt":true}"#).expect("parse");
        assert!(matches!(asked, Message::Taken { adopt: true }));
    }

    #[test]
    fn silence_is_a_timeout() {
        let (_a, b) = UnixStream::pair().expect("pair");
        b.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .expect("timeout");
        assert!(matches!(recv(&b), Err(TakeoverError::Timeout)));
    }
}
