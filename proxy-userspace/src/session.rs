//! One client connection, from accept to the audit line that closes it:
//! admit, connect upstream, splice, report.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use proxy_common::session::{AUTH_PREAMBLE, DirectionCounters};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::auth::preamble::{Status, encode_response};
use crate::auth::{DenyReason, GrantId};
use crate::datapath::userspace::{RelayState, Relayed};
use crate::datapath::{Datapath, EndReason, SessionMeta, SpliceOutcome};
use crate::gate::{Gate, Refusal};
use crate::registry::Registry;
use crate::sockopt;

/// How long a refused client gets to read the agent's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

pub use crate::gate::Admitted;

pub mod adopt;
mod events;
use events::{Ending, base_event, duration_ms, record_open};

/// What every session needs from the agent.
pub struct Services {
    pub datapath: Datapath,
    pub audit: AuditLog,
    pub registry: Arc<Registry>,
    pub connect_timeout: Duration,
    /// `agent.stall_timeout`, applied to both sockets of every session.
    pub stall_timeout: Duration,
    /// `SO_MARK` for upstream sockets, when interception needs it.
    pub upstream_mark: Option<u32>,
    /// Present when interception is installed.
    pub interceptor: Option<Arc<crate::intercept::Interceptor>>,
    /// Present when `[auth]` is configured; absent, every connection is
    /// admitted unauthenticated.
    pub gate: Option<Arc<Gate>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where sessions parked for a successor go (see [`adopt`]).
    pub parking: adopt::Parking,
}

/// Where an accepted connection goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// What the client dialled.
    pub destination: SocketAddr,
    /// Where the agent connects.
    pub upstream: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot create upstream socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot mark upstream socket (needs CAP_NET_ADMIN)")]
    Mark(#[source] std::io::Error),
    #[error("connection to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Opens the upstream connection, marked so interception leaves it alone,
/// with the stall bounds and `TCP_NODELAY` set before the handshake (the
/// client's socket inherits them from its listener).
pub async fn connect_upstream(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
    stall_timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ConnectError::Socket)?;
    if let Some(mark) = mark {
        sockopt::set_mark(socket.as_fd(), mark).map_err(ConnectError::Mark)?;
    }
    sockopt::set_stall_timeout(socket.as_fd(), stall_timeout).map_err(ConnectError::Socket)?;
    sockopt::set_nodelay(socket.as_fd()).map_err(ConnectError::Socket)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ConnectError::Connect { addr, source }),
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
    }
}

/// Admits (or refuses) one accepted connection, then serves it.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in every live session"
)]
pub fn handle(
    services: Arc<Services>,
    mut client: TcpStream,
    peer: SocketAddr,
    target: Target,
) -> impl Future<Output = ()> {
    // An `async move` block, not an `async fn`: an `async fn` moves its
    // arguments into locals and keeps both copies for the session's life.
    async move {
        let admitted = match &services.gate {
            None => Admitted::unauthenticated(),
            Some(gate) => {
                let clock = Instant::now();
                let (slot, hit) = gate.pending.enter(peer.ip());
                for bound in hit {
                    services.metrics.limit_hit(bound.as_str());
                }
                // Boxed: its state is dropped once decided instead of sizing every
                // live session's future.
                let decision = tokio::select! {
                    decision = Box::pin(gate.admit(&mut client, peer, target.destination)) => decision,
                    bound = slot.shed() => Err(Refusal::shed(bound)),
                };
                drop(slot);
                services
                    .metrics
                    .authenticated(decision.is_ok(), clock.elapsed());
                match decision {
                    Ok(admitted) => admitted,
                    Err(refusal) => {
                        // Boxed: a rare path, kept out of every live session's future.
                        Box::pin(refuse(&services, client, peer, &target, refusal)).await;
                        return;
                    }
                }
            }
        };
        serve(services, client, peer, target, admitted).await;
    }
}

/// Refuses an authenticated-path connection: tell the client why when it
/// speaks the preamble protocol, close, and write one audit line.
async fn refuse(
    services: &Services,
    mut client: TcpStream,
    peer: SocketAddr,
    target: &Target,
    refusal: Refusal,
) {
    let mut event = base_event(
        EventKind::ConnectionDenied,
        peer,
        target,
        &Admitted::default(),
    );
    event.upstream = None;
    event.subject = refusal.subject;
    event.claims = refusal.claims.into();
    event.reason = Some(EndReason::AuthFailed.as_str().to_owned());
    // The detail may quote what the peer sent (a `kid`): bounded here for
    // the log line too, not only in the audit line.
    let detail = crate::audit::truncate(refusal.detail, crate::audit::MAX_DETAIL);
    tracing::info!(client = %peer, destination = %target.destination, reason = refusal.reason.as_str(), detail = %detail, "connection denied");
    event.detail = Some(format!("{}: {detail}", refusal.reason));
    services.metrics.denied(refusal.reason.as_str());
    services.audit.record(event);
    match refusal.answer {
        Some((status, message)) => answer_and_close(&mut client, status, message.as_str()).await,
        None => {
            let _ = sockopt::set_linger_zero(client.as_fd());
        }
    }
}

async fn answer_and_close(client: &mut TcpStream, status: Status, message: &str) {
    let frame = encode_response(status, message);
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
        client.write_all(&frame).await?;
        client.shutdown().await
    })
    .await;
}

/// Refuses a connection before admission: RST to the client and one audit line.
pub fn deny(
    services: &Services,
    client: &TcpStream,
    peer: SocketAddr,
    target: &Target,
    reason: DenyReason,
    detail: String,
) {
    tracing::info!(client = %peer, destination = %target.destination, reason = reason.as_str(), %detail, "connection denied");
    services.metrics.denied(reason.as_str());
    let _ = sockopt::set_linger_zero(client.as_fd());
    let mut event = base_event(
        EventKind::ConnectionDenied,
        peer,
        target,
        &Admitted::default(),
    );
    event.reason = Some(reason.as_str().to_owned());
    event.detail = Some(detail);
    services.audit.record(event);
}

/// Serves one admitted connection to its end.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in every live session"
)]
pub fn serve(
    services: Arc<Services>,
    mut client: TcpStream,
    peer: SocketAddr,
    target: Target,
    admitted: Admitted,
) -> impl Future<Output = ()> {
    // An `async move` block for the same reason as `handle`.
    async move {
        let Some(mut admission) = services.registry.admit() else {
            let limit = services.registry.capacity();
            deny(
                &services,
                &client,
                peer,
                &target,
                DenyReason::SessionLimit,
                format!("{limit} sessions already live"),
            );
            release_grant(&services, &admitted);
            return;
        };
        services.metrics.accepted();
        let started = SystemTime::now();
        let clock = Instant::now();
        let connected = connect_upstream(
            target.upstream,
            services.upstream_mark,
            services.connect_timeout,
            services.stall_timeout,
        )
        .await;
        services
            .metrics
            .upstream_connected(connected.is_ok(), clock.elapsed());
        let upstream = match connected {
            Ok(stream) => stream,
            Err(e) => {
                let detail = crate::error_chain(&e);
                tracing::warn!(client = %peer, upstream = %target.upstream, error = %detail, "upstream unreachable");
                if admitted.answer_preamble {
                    // The detail (address, errno) stays in the audit line.
                    answer_and_close(&mut client, Status::Error, "upstream unreachable").await;
                } else {
                    let _ = sockopt::set_linger_zero(client.as_fd());
                }
                let mut event = base_event(EventKind::SessionClose, peer, &target, &admitted);
                event.session_id = Some(format!("{:016x}", admission.id()));
                event.reason = Some(EndReason::UpstreamUnreachable.as_str().to_owned());
                event.detail = Some(detail);
                event.duration_ms = Some(duration_ms(clock.elapsed()));
                services.metrics.session_closed(
                    EndReason::UpstreamUnreachable.as_str(),
                    &DirectionCounters::default(),
                    &DirectionCounters::default(),
                    None,
                );
                services.audit.record(event);
                release_grant(&services, &admitted);
                return;
            }
        };
        let admitted =
            match settle_opening(&services, &mut client, &upstream, &target, admitted).await {
                Ok(admitted) => admitted,
                Err(refusal) => {
                    // Boxed: a rare path, kept out of every live session's future.
                    Box::pin(refuse(&services, client, peer, &target, refusal)).await;
                    return;
                }
            };
        if admitted.answer_preamble {
            // Written before the splice, so it precedes any upstream byte.
            let frame = encode_response(Status::Ok, "connected");
            if let Err(e) = client.write_all(&frame).await {
                tracing::debug!(client = %peer, error = %e, "client left before the answer");
            }
        }
        let meta = SessionMeta {
            id: admission.id(),
            grant_id: admitted.grant_id,
            started,
            expires: admitted.expires,
            client: peer,
            destination: target.destination,
            upstream: target.upstream,
            auth_method: admitted.auth_method,
            subject: std::sync::Arc::clone(&admitted.subject),
        };
        let stop = admission.register(meta.clone());
        recheck_grant(&services, &meta);
        record_open(&services, &meta, &target, &admitted);
        tracing::debug!(session = %format_args!("{:016x}", meta.id), client = %peer, upstream = %target.upstream, "session spliced");

        let relayed = services
            .datapath
            .relay(
                &meta,
                client,
                upstream,
                stop,
                RelayState::default(),
                admitted.partly_read,
            )
            .await;
        if let Some(interceptor) = &services.interceptor {
            interceptor.session_ended(meta.id);
        }
        let outcome = match relayed {
            Relayed::Ended(outcome) => outcome,
            Relayed::Parked(parked) => {
                // Handed over: the successor writes its close line (or this
                // agent, if it resumes the session after all).
                adopt::park(&services, &meta, &admitted, *parked);
                return;
            }
        };
        let ending = Ending {
            meta: &meta,
            target: &target,
            admitted: &admitted,
            elapsed: clock.elapsed(),
            handover: None,
        };
        ending.record(&services, outcome, admission);
    }
}

/// See [`Gate::settle_opening`].
async fn settle_opening(
    services: &Services,
    client: &mut TcpStream,
    upstream: &TcpStream,
    target: &Target,
    admitted: Admitted,
) -> Result<Admitted, Refusal> {
    match &services.gate {
        Some(gate) if admitted.opening_unseen => {
            Box::pin(gate.settle_opening(client, upstream, target.destination, admitted)).await
        }
        _ => Ok(admitted),
    }
}

/// Closes the admission race: a revocation (or expiry) that removed the
/// grant after admission read it but before the session was registered
/// found no session to stop; the session stops itself instead.
fn recheck_grant(services: &Services, meta: &SessionMeta) {
    let Some(gate) = &services.gate else {
        return;
    };
    if meta.grant_id == 0 || gate.holds(GrantId(meta.grant_id)) {
        return;
    }
    let reason = if meta.expires.is_some_and(|at| at <= SystemTime::now()) {
        EndReason::GrantExpired
    } else {
        EndReason::Revoked
    };
    services.registry.stop_one(meta.id, reason);
}

/// `tcpgate revoke` without the API destroys a grant's sockets from
/// outside: the session sees its peer abort, but it was revoked.
fn revoked_outside(services: &Services, meta: &SessionMeta, outcome: &mut SpliceOutcome) {
    let peer_ended = matches!(
        outcome.reason,
        EndReason::ClientClosed | EndReason::UpstreamClosed
    );
    if peer_ended
        && meta.grant_id != 0
        && services
            .gate
            .as_ref()
            .is_some_and(|gate| gate.revoked_outside(meta.grant_id))
    {
        let was = outcome.detail.take().unwrap_or_default();
        outcome.reason = EndReason::Revoked;
        outcome.detail = Some(format!(
            "revoked through the pinned map while the agent was not answering; sockets destroyed by tcpgate revoke ({was})"
        ));
    }
}

/// A preamble grant admits exactly one session; it ends with it.
fn release_grant(services: &Services, admitted: &Admitted) {
    if admitted.auth_method == AUTH_PREAMBLE
        && let Some(gate) = &services.gate
    {
        gate.release(GrantId(admitted.grant_id));
    }
}
