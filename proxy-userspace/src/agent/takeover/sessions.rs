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
/// adopt (`adopt`): parks the user-space sessions a batch at a time (a
/// session pauses only while its own batch crosses) and sends each batch.
/// Those the successor did not take go on here, and drain. Returns the
/// link, to follow the successor's revocations on.
pub async fn hand_over_sessions(
    services: &Arc<Services>,
    mut link: UnixStream,
    adopt: bool,
    timeout: Duration,
) -> Option<UnixStream> {
    if !adopt {
        return Some(link);
    }
    // Preamble sessions are not asked: their grant is not handed over.
    let ids: Vec<u64> = if services.datapath.kind() == DatapathKind::Userspace {
        services
            .registry
            .snapshot()
            .iter()
            .filter(|m| m.auth_method != AUTH_PREAMBLE)
            .map(|m| m.id)
            .collect()
    } else {
        Vec::new()
    };
    let mut rx = services.parking.open();
    let (mut adopted, mut kept, mut complete) = (0, Vec::new(), true);
    for chunk in ids.chunks(BATCH) {
        let batch = park(services, &mut rx, chunk, timeout).await;
        if batch.is_empty() {
            continue;
        }
        let sent = tokio::task::spawn_blocking(move || {
            let result = send_batch(&link, &batch);
            (link, batch, result)
        })
        .await;
        let Ok((back, batch, result)) = sent else {
            tracing::error!("the session handover task failed; its batch is lost");
            return None;
        };
        link = back;
        match result {
            // The successor holds its own descriptors: ours close here.
            Ok(()) => adopted += batch.len(),
            Err(failed) => {
                tracing::warn!(
                    error = %crate::error_chain(&failed.error),
                    lost = if failed.delivered { batch.len() } else { 0 },
                    "the successor did not take every session; the rest stay here"
                );
                if !failed.delivered {
                    kept.extend(batch);
                }
                complete = false;
                break;
            }
        }
    }
    services.parking.close();
    while let Ok(late) = rx.try_recv() {
        kept.push(*late);
    }
    let link = if complete {
        finish(link).await
    } else {
        Some(link)
    };
    tracing::info!(
        adopted,
        resumed = kept.len(),
        "live sessions handed over; the rest stay here"
    );
    for session in kept {
        tokio::spawn(resume(Arc::clone(services), session, Resumed::Kept));
    }
    link
}

/// Tells the successor no more sessions come.
async fn finish(link: UnixStream) -> Option<UnixStream> {
    let done = tokio::task::spawn_blocking(move || {
        if let Err(e) = wire::send(&link, &Message::SessionsDone, &[]) {
            tracing::warn!(error = %crate::error_chain(&e), "cannot end the session handover");
        }
        link
    });
    done.await.ok()
}

/// The successor's side: registers one received session (it is listed
/// and can be revoked from now on) and returns the task going on with it;
/// `None` when its sockets cannot be used (they close). Call it within the
/// runtime's context.
pub fn adopt(
    services: Arc<Services>,
    received: Received,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let id = received.handed.meta.id;
    let stream = |fd: OwnedFd| {
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        // A predecessor of an older release may have left Nagle on.
        stream.set_nodelay(true)?;
        tokio::net::TcpStream::from_std(stream)
    };
    match (stream(received.client), stream(received.upstream)) {
        (Ok(client), Ok(upstream)) => {
            let session = ParkedSession {
                handed: received.handed,
                client,
                upstream,
            };
            Some(resume(services, session, Resumed::Adopted))
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(session = %format_args!("{id:016x}"), error = %e, "cannot adopt a session's sockets; it ends");
            None
        }
    }
}

/// Asks the sessions `ids` to park and collects them (a session that
/// ended meanwhile is not there).
async fn park(
    services: &Services,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Box<ParkedSession>>,
    ids: &[u64],
    timeout: Duration,
) -> Vec<ParkedSession> {
    for id in ids {
        services.registry.stop_one(*id, EndReason::HandedOver);
    }
    // A parked session leaves the registry right after it is collected.
    let left = services.registry.wait_ended(ids, timeout).await;
    if !left.is_empty() {
        tracing::warn!(
            sessions = left.len(),
            "sessions did not park in time; they stay here"
        );
    }
    let mut batch = Vec::with_capacity(ids.len());
    while let Ok(session) = rx.try_recv() {
        batch.push(*session);
    }
    batch
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
