//! Revocations after a takeover. The old agent's sessions drain with the
//! old agent's grants; `tcpgate revoke` reaches the successor only. The
//! takeover connection therefore stays open while the old agent drains,
//! and the successor sends it every grant its store revokes (by the API,
//! a subject, the pinned map or the fleet), which the old agent revokes in
//! its own store: its draining sessions end as `revoked` like the
//! successor's. When the successor is gone the old agent still ends them
//! at their grants' expiry (its own timers).

use std::os::unix::net::UnixStream as StdStream;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;

use super::{Message, TakeoverError, unexpected, wire};
use crate::auth::{GrantEvent, GrantId};
use crate::gate::Gate;

/// The successor's side: sends each revoked grant to the old agent `pid`
/// until it closes the connection (it drained and exited).
pub fn forward_revocations(stream: StdStream, gate: &Gate, pid: u32) {
    let mut events = gate.grant_events();
    let mut subjects = gate.subject_revocations();
    let mut stream = match into_async(stream) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(predecessor = pid, error = %e, "cannot forward revocations to the draining agent; its sessions end at their grants' expiry");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                event = events.recv() => match event {
                    Ok(GrantEvent::Revoked(id)) => Message::Revoke { grant: id.0 },
                    Ok(_) => continue,
                    Err(RecvError::Closed) => return,
                    Err(e) => { lagged(pid, &e); continue; }
                },
                revoked = subjects.recv() => match revoked {
                    Ok(revoked) => Message::RevokeSubject(revoked),
                    Err(RecvError::Closed) => return,
                    Err(e) => { lagged(pid, &e); continue; }
                },
            };
            if let Err(e) = send(&mut stream, &message).await {
                tracing::info!(predecessor = pid, reason = %e, "the draining agent is gone; no more revocations to forward");
                return;
            }
        }
    });
}

/// Events a slow forwarder missed.
fn lagged(pid: u32, e: &RecvError) {
    tracing::warn!(predecessor = pid, error = %e, "revocation events lagged; some may not reach the draining agent");
}

/// The old agent's side: revokes every grant the successor sends, until
/// the successor closes the connection.
pub fn follow_revocations(stream: StdStream, gate: Option<Arc<Gate>>, successor: u32) {
    let mut stream = match into_async(stream) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(successor, error = %e, "cannot follow the successor's revocations; draining sessions end at their grants' expiry");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            match recv(&mut stream).await {
                Ok(Message::Revoke { grant }) => {
                    let revoked = gate.as_ref().and_then(|gate| gate.revoke(GrantId(grant)));
                    if let Some(grant) = revoked {
                        tracing::warn!(grant = %grant.id, subject = %grant.subject, "grant revoked by the successor; its draining sessions end");
                    }
                }
                Ok(Message::RevokeSubject(revoked)) => {
                    // Said before the sessions end, so the line precedes their close lines.
                    tracing::warn!(subject = %revoked.subject, "subject revoked by the successor; its draining sessions end");
                    let ended = gate.as_ref().map_or(0, |gate| {
                        gate.revoke_subject_held(
                            &revoked.subject,
                            &revoked.holds,
                            revoked.revoked_at,
                        )
                        .len()
                    });
                    tracing::info!(subject = %revoked.subject, grants = ended, "grants of the revoked subject ended");
                }
                Ok(other) => {
                    let e = unexpected("revoke", &other);
                    tracing::warn!(successor, error = %e, "no more revocations from the successor");
                    return;
                }
                Err(e) => {
                    tracing::warn!(successor, reason = %e, "the successor closed the takeover connection; draining sessions still end at their grants' expiry");
                    return;
                }
            }
        }
    });
}

fn into_async(stream: StdStream) -> std::io::Result<UnixStream> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

/// Same framing as [`wire`], without descriptors.
async fn send(stream: &mut UnixStream, message: &Message) -> Result<(), TakeoverError> {
    let frame = wire::frame(message)?;
    stream.write_all(&frame).await.map_err(wire::io_error)
}

async fn recv(stream: &mut UnixStream) -> Result<Message, TakeoverError> {
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .await
        .map_err(wire::io_error)?;
    let len = wire::checked_len(header)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(wire::io_error)?;
    serde_json::from_slice(&body).map_err(TakeoverError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_revocation_crosses_the_connection_and_a_close_ends_it() {
        let (a, b) = StdStream::pair().expect("pair");
        let mut a = into_async(a).expect("async");
        let mut b = into_async(b).expect("async");
        send(&mut a, &Message::Revoke { grant: 42 })
            .await
            .expect("send");
        assert!(matches!(
            recv(&mut b).await,
            Ok(Message::Revoke { grant: 42 })
        ));
        drop(a);
        assert!(matches!(recv(&mut b).await, Err(TakeoverError::Closed)));
    }
}
