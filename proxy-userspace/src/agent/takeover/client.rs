//! The successor's side: ask the running agent for its listeners and
//! state, take its locks, and tell it when this agent accepts.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{
    HandedState, ListenerSet, Message, STATE_VERSION, TakeoverError, advertised_version,
    set_timeouts, unexpected, wire,
};

/// The agent being taken over, once it released its locks.
#[derive(Debug)]
pub struct Predecessor {
    stream: UnixStream,
    pub pid: u32,
    pub state_version: u32,
    pub state: HandedState,
}

/// What asking for a takeover gave: the listeners offered (kept even when
/// a later step failed: a predecessor killed mid-takeover no longer
/// holds them, and the connections queued on them are ours to accept),
/// and the predecessor when it released its locks.
#[derive(Debug, Default)]
pub struct Attempt {
    pub listeners: ListenerSet,
    pub predecessor: Option<Predecessor>,
}

/// Asks the agent waiting at `path` to hand over. Blocking: each step
/// waits at most `timeout`. Errors are logged; the caller then starts as
/// it would without a predecessor.
pub fn request(path: &Path, timeout: Duration) -> Attempt {
    let mut attempt = Attempt::default();
    match handshake(path, timeout, &mut attempt.listeners) {
        Ok(predecessor) => {
            tracing::info!(
                pid = predecessor.pid,
                state_version = predecessor.state_version,
                listeners = attempt.listeners.infos().len(),
                "taking over from the running agent"
            );
            if predecessor.state_version != advertised_version() {
                tracing::warn!(
                    ours = advertised_version(),
                    theirs = predecessor.state_version,
                    "state versions differ: nothing is adopted, every live session drains in the old agent"
                );
            } else {
                tracing::info!(
                    "user-space sessions are adopted; kernel-path ones drain in the old agent"
                );
            }
            attempt.predecessor = Some(predecessor);
        }
        Err(e @ TakeoverError::NoAgent(_)) => {
            tracing::info!(reason = %e, "nothing to take over; starting afresh");
        }
        Err(e) => {
            tracing::warn!(
                error = %crate::error_chain(&e),
                inherited = attempt.listeners.infos().len(),
                "takeover failed; starting afresh (cleaning up what a vanished agent left)"
            );
        }
    }
    attempt
}

fn handshake(
    path: &Path,
    timeout: Duration,
    listeners: &mut ListenerSet,
) -> Result<Predecessor, TakeoverError> {
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(TakeoverError::NoAgent(path.to_owned()));
        }
        Err(source) => {
            return Err(TakeoverError::Connect {
                path: path.to_owned(),
                source,
            });
        }
    };
    set_timeouts(&stream, timeout).map_err(TakeoverError::Io)?;
    let hello = Message::Hello {
        state_version: advertised_version(),
        pid: std::process::id(),
    };
    wire::send(&stream, &hello, &[])?;
    let (offer, fds) = wire::recv(&stream)?;
    let Message::Offer {
        state_version,
        pid,
        listeners: infos,
        state,
    } = offer
    else {
        return Err(unexpected("offer", &offer));
    };
    *listeners = ListenerSet::from_offer(infos, fds)?;
    wire::send(&stream, &Message::Take, &[])?;
    match wire::recv(&stream)?.0 {
        Message::Released => {}
        other => return Err(unexpected("released", &other)),
    }
    Ok(Predecessor {
        stream,
        pid,
        state_version,
        state,
    })
}

impl Predecessor {
    /// Whether its state can be adopted (the versions match).
    #[must_use]
    pub fn compatible(&self) -> bool {
        self.state_version == STATE_VERSION && advertised_version() == STATE_VERSION
    }

    /// This agent accepts on the inherited listeners: the old one may stop
    /// accepting. With `adopt`, the old agent then sends its live
    /// sessions, each batch given to `on_batch` as it comes. Returns the
    /// connection (kept open while the old agent drains: this agent's
    /// revocations go through it) and how many sessions were adopted.
    pub fn taken(
        self,
        adopt: bool,
        on_batch: impl FnMut(Vec<super::Received>),
    ) -> Result<(UnixStream, usize), TakeoverError> {
        wire::send(&self.stream, &Message::Taken { adopt }, &[])?;
        let adopted = if adopt {
            super::sessions::receive_all(&self.stream, on_batch)?
        } else {
            0
        };
        Ok((self.stream, adopted))
    }
}
