//! Live sessions across a takeover: the old agent parks its user-space
//! sessions and sends them in batches of [`BATCH`]; the successor adopts
//! each batch and acknowledges it before the next one goes. What was not
//! acknowledged when the successor dies or stalls stays with the old
//! agent (the batch in flight is the successor's: its descriptors reached
//! it, and they close with it).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use proxy_common::session::AUTH_PREAMBLE;

use super::{Message, STALL_ENV, TakeoverError, unexpected, wire};
use crate::datapath::{DatapathKind, EndReason};
use crate::session::Services;
use crate::session::adopt::{HandedSession, ParkedSession, Resumed, resume};

/// Sessions per message: two descriptors each, within [`wire::MAX_FDS`].
pub const BATCH: usize = wire::MAX_FDS / 2;

/// A session received by the successor: its state and its two sockets.
pub struct Received {
    pub handed: HandedSession,
    pub client: OwnedFd,
    pub upstream: OwnedFd,
}

/// The old agent's side, once taken over by a successor that asked to
/// adopt (`adopt`): parks every user-space session and sends them. The
/// sessions the successor did not take go on here, and drain. Returns the
/// link, to follow the successor's revocations on.
pub async fn hand_over_sessions(
    services: &Arc<Services>,
    link: UnixStream,
    adopt: bool,
    timeout: Duration,
) -> Option<UnixStream> {
    if !adopt {
        return Some(link);
    }
    let parked = if services.datapath.kind() == DatapathKind::Userspace {
        park_all(services, timeout).await
    } else {
        Vec::new()
    };
    let count = parked.len();
    let (link, kept) = match tokio::task::spawn_blocking(move || {
        let kept = send_all(&link, parked);
        (link, kept)
    })
    .await
    {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(error = %e, "the session handover task failed; its sessions are lost");
            return None;
        }
    };
    tracing::info!(
        parked = count,
        adopted = count - kept.len(),
        kept = kept.len(),
        "live sessions handed over"
    );
    for session in kept {
        tokio::spawn(resume(Arc::clone(services), session, Resumed::Kept));
    }
    Some(link)
}

/// The successor's side: goes on with one received session.
pub async fn adopt(services: Arc<Services>, received: Received) {
    let id = received.handed.id;
    let stream = |fd: OwnedFd| {
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    };
    match (stream(received.client), stream(received.upstream)) {
        (Ok(client), Ok(upstream)) => {
            let session = ParkedSession {
                handed: received.handed,
                client,
                upstream,
            };
            resume(services, session, Resumed::Adopted).await;
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(session = %format_args!("{id:016x}"), error = %e, "cannot adopt a session's sockets; it ends");
        }
    }
}

/// Asks every user-space session to park and collects them. Preamble
/// sessions are not asked: their grant is not handed over.
async fn park_all(services: &Services, timeout: Duration) -> Vec<ParkedSession> {
    let mut rx = services.parking.open();
    let ids: Vec<u64> = services
        .registry
        .stop_listed(EndReason::HandedOver, |m| m.auth_method != AUTH_PREAMBLE)
        .into_iter()
        .map(|s| s.session)
        .collect();
    // A parked session leaves the registry right after it is collected.
    let left = services.registry.wait_ended(&ids, timeout).await;
    if !left.is_empty() {
        tracing::warn!(
            sessions = left.len(),
            "sessions did not park in time; they stay here"
        );
    }
    services.parking.close();
    let mut parked = Vec::with_capacity(ids.len());
    while let Ok(session) = rx.try_recv() {
        parked.push(session);
    }
    parked
}

/// Sends the sessions batch by batch; returns those not taken.
fn send_all(link: &UnixStream, mut parked: Vec<ParkedSession>) -> Vec<ParkedSession> {
    while !parked.is_empty() {
        let rest = parked.split_off(parked.len().min(BATCH));
        let batch = std::mem::replace(&mut parked, rest);
        match send_batch(link, &batch) {
            Ok(()) => {}
            Err(failed) => {
                tracing::warn!(
                    error = %crate::error_chain(&failed.error),
                    lost = if failed.delivered { batch.len() } else { 0 },
                    kept = parked.len() + if failed.delivered { 0 } else { batch.len() },
                    "the successor did not take every session; the rest stay here"
                );
                if !failed.delivered {
                    parked.extend(batch);
                }
                return parked;
            }
        }
    }
    if let Err(e) = wire::send(link, &Message::SessionsDone, &[]) {
        tracing::warn!(error = %crate::error_chain(&e), "cannot end the session handover");
    }
    Vec::new()
}

fn send_batch(link: &UnixStream, batch: &[ParkedSession]) -> Result<(), wire::SendFailed> {
    let message = Message::Sessions {
        sessions: batch.iter().map(|s| s.handed.clone()).collect(),
    };
    let fds: Vec<BorrowedFd<'_>> = batch
        .iter()
        .flat_map(|s| [s.client.as_fd(), s.upstream.as_fd()])
        .collect();
    wire::send_fds(link, &message, &fds)?;
    let delivered = |error| wire::SendFailed {
        error,
        delivered: true,
    };
    match wire::recv(link).map_err(delivered)?.0 {
        Message::Adopted { count } if count == batch.len() => Ok(()),
        other => Err(delivered(unexpected("adopted", &other))),
    }
}

/// The successor's side: receives batches until `sessions_done`, giving
/// each to `adopt` and acknowledging it. Returns how many were adopted.
pub fn receive_all(
    link: &UnixStream,
    mut adopt: impl FnMut(Vec<Received>),
) -> Result<usize, TakeoverError> {
    let mut adopted = 0;
    loop {
        let (message, fds) = wire::recv(link)?;
        let sessions = match message {
            Message::Sessions { sessions } => sessions,
            Message::SessionsDone => return Ok(adopted),
            other => return Err(unexpected("sessions", &other)),
        };
        let count = sessions.len();
        adopt(pair_up(sessions, fds)?);
        adopted += count;
        if std::env::var(STALL_ENV).is_ok_and(|v| v == "adopt") {
            tracing::warn!(
                adopted,
                "{STALL_ENV}=adopt: not answering the old agent (test hook)"
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        wire::send(link, &Message::Adopted { count }, &[])?;
    }
}

/// Each session with its two descriptors.
fn pair_up(
    sessions: Vec<HandedSession>,
    fds: Vec<OwnedFd>,
) -> Result<Vec<Received>, TakeoverError> {
    if fds.len() != 2 * sessions.len() {
        return Err(TakeoverError::SessionFds {
            sessions: sessions.len(),
            fds: fds.len(),
        });
    }
    let mut fds = fds.into_iter();
    Ok(sessions
        .into_iter()
        .filter_map(|handed| {
            Some(Received {
                handed,
                client: fds.next()?,
                upstream: fds.next()?,
            })
        })
        .collect())
}
