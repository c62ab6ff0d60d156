//! Setting a session up on the kernel path, and the ways out when it
//! cannot be: the per-session user-space copy, or a reset.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use proxy_common::session::DirectionCounters;
use tokio::net::TcpStream;

use super::super::ebpf::{EbpfDatapath, SpliceSetupError};
use super::super::stall::StallWatch;
use super::super::{DatapathKind, EndReason, SessionMeta, SpliceOutcome, StopSignal};
use super::dir::{PerDir, PerSide};
use super::lane::QueueWatch;
use super::{Direction, Ending, Session};
use crate::sockopt;

pub(in crate::datapath) async fn run(
    dp: &EbpfDatapath,
    meta: &SessionMeta,
    client: TcpStream,
    upstream: TcpStream,
    stop: StopSignal,
) -> SpliceOutcome {
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            return failed(format!("cannot detach sockets from the runtime: {e}"));
        }
    };
    // Held first, so that no byte arriving from here on runs a verdict
    // whose peer is not in the SOCKHASH yet; then a settled read per socket
    // gives both its state and its bytes-sent baseline. Settled, because an
    // acknowledgement of what the agent wrote before (a preamble's answer)
    // can land between the read's two halves, and a baseline short by those
    // bytes would let the drain barrier shut the peer down too early.
    let hold = |fd: BorrowedFd<'_>, bytes| sockopt::set_rcvlowat(fd, bytes);
    let prepared = hold(client.as_fd(), i32::MAX)
        .and_then(|()| hold(upstream.as_fd(), i32::MAX))
        .and_then(|()| {
            Ok((
                sockopt::settled_send_state(client.as_fd())?,
                sockopt::settled_send_state(upstream.as_fd())?,
            ))
        });
    let (client_state, upstream_state) = match prepared {
        Ok(states) => states,
        Err(e) => {
            return abort_unspliced(&client, &upstream, format!("cannot prepare sockets: {e}"));
        }
    };
    // SOCKHASH takes only ESTABLISHED sockets: a peer that already sent its
    // FIN (a client that writes and half-closes at once) leaves its socket in
    // CLOSE_WAIT, and the session is copied in user space instead (which
    // lowers SO_RCVLOWAT again).
    if client_state.tcp_state != TCP_ESTABLISHED || upstream_state.tcp_state != TCP_ESTABLISHED {
        return Box::pin(copy_instead(
            dp,
            meta,
            client,
            upstream,
            stop,
            "a peer half-closed before the splice",
        ))
        .await;
    }
    let baselines = PerSide::new(client_state.handed_to_tcp(), upstream_state.handed_to_tcp());
    if dp.timeouts.sndbuf > 0 {
        for socket in [client.as_fd(), upstream.as_fd()] {
            if let Err(e) = sockopt::force_sndbuf(socket, dp.timeouts.sndbuf) {
                tracing::debug!(error = %e, "cannot force the send buffer");
            }
        }
    }
    // Only for the audit line: how much the kick below has to push through.
    let queued = (
        sockopt::queued_bytes(client.as_fd()).unwrap_or(0),
        sockopt::queued_bytes(upstream.as_fd()).unwrap_or(0),
    );
    let cookies = match dp.insert(meta, client.as_fd(), upstream.as_fd()) {
        Ok(c) => c,
        Err(SpliceSetupError::NotEstablished) => {
            return Box::pin(copy_instead(
                dp,
                meta,
                client,
                upstream,
                stop,
                "a peer half-closed during the splice setup",
            ))
            .await;
        }
        Err(e) => return abort_unspliced(&client, &upstream, format!("{e}: {}", error_chain(&e))),
    };
    // Held sockets run no verdict, except when a FIN lands between the two
    // insertions: then bytes may have been passed to their own socket
    // instead of the peer. Never continue silently after that.
    let (up, down) = dp.live_counters(meta.id).unwrap_or_default();
    if up.redirect_failures + down.redirect_failures > 0 {
        let (up, down) = dp.remove(meta.id, cookies);
        let mut outcome = abort_unspliced(
            &client,
            &upstream,
            "a FIN raced the splice setup and bytes could not be redirected; the session was reset"
                .into(),
        );
        (outcome.up, outcome.down) = (up, down);
        return outcome;
    }
    let kicked = hold(client.as_fd(), 1).and_then(|()| hold(upstream.as_fd(), 1));
    let stall = StallWatch::new(Instant::now());
    // In a block: the session's storage ends before the yield below, so
    // the yield's state does not add to the future's size.
    let closed = {
        let mut session = Session {
            dp,
            id: meta.id,
            client,
            upstream,
            baselines,
            queued,
            dirs: PerDir::new(Direction::new(), Direction::new()),
            first_close: None,
            attempt: 0,
            stalls: PerSide::new(stall, stall),
            cookies,
            registered: PerSide::default(),
            queue: QueueWatch::new(Instant::now()),
            // Look early: a fast sender can queue gigabytes within a second.
            queue_at: tokio::time::Instant::now() + std::time::Duration::from_millis(5),
        };
        let ending = match kicked {
            Ok(()) => Box::pin(session.watch(meta, stop)).await,
            Err(e) => Ending::internal(format!("cannot release held bytes: {e}")),
        };
        session.close(ending)
    };
    if closed.aborted() {
        // The sessions one expiry or revocation ends wake together: each
        // closes its sockets, then lets the others close theirs before
        // doing its bookkeeping (map removals here, metrics, grant and
        // audit line in the session), so the last peers learn of the end
        // sooner. tokio runs a yielded task once the queued ones have run.
        tokio::task::yield_now().await;
    }
    closed.report()
}

fn failed(detail: String) -> SpliceOutcome {
    SpliceOutcome {
        reason: EndReason::InternalError,
        detail: Some(detail),
        up: DirectionCounters::default(),
        down: DirectionCounters::default(),
        queued_at_splice: None,
        datapath: DatapathKind::Ebpf,
    }
}

/// `TCP_ESTABLISHED` from the kernel's `enum tcp_state`.
const TCP_ESTABLISHED: u8 = 1;

/// Runs a session that cannot be spliced on the user-space copy.
async fn copy_instead(
    dp: &EbpfDatapath,
    meta: &SessionMeta,
    client: std::net::TcpStream,
    upstream: std::net::TcpStream,
    stop: StopSignal,
    why: &str,
) -> SpliceOutcome {
    let _ = sockopt::set_rcvlowat(client.as_fd(), 1);
    let _ = sockopt::set_rcvlowat(upstream.as_fd(), 1);
    tracing::info!(session = %format_args!("{:016x}", meta.id), why, "copying this session in user space");
    let (client, upstream) = match (TcpStream::from_std(client), TcpStream::from_std(upstream)) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            return failed(format!("cannot hand sockets back to the runtime: {e}"));
        }
    };
    let mut outcome = dp.fallback.splice(meta, client, upstream, stop).await;
    outcome
        .detail
        .get_or_insert_with(|| format!("copied in user space: {why}"));
    outcome
}

fn abort_unspliced(
    client: &std::net::TcpStream,
    upstream: &std::net::TcpStream,
    detail: String,
) -> SpliceOutcome {
    let _ = sockopt::set_linger_zero(client.as_fd());
    let _ = sockopt::set_linger_zero(upstream.as_fd());
    tracing::error!(%detail, "session setup on the eBPF path failed");
    failed(detail)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = error.source();
    while let Some(e) = source {
        parts.push(e.to_string());
        source = e.source();
    }
    parts.join(": ")
}
