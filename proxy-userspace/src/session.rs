//! One client connection, from accept to the audit line that closes it:
//! admit, connect upstream, splice, report.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use proxy_common::session::AUTH_NONE;
use tokio::net::{TcpSocket, TcpStream};

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::datapath::{Datapath, SessionMeta, SpliceOutcome};
use crate::registry::Registry;
use crate::sockopt;

/// What every session needs from the agent.
pub struct Services {
    pub datapath: Datapath,
    pub audit: AuditLog,
    pub registry: Arc<Registry>,
    pub connect_timeout: Duration,
    /// `SO_MARK` for upstream sockets, when interception needs it.
    pub upstream_mark: Option<u32>,
    /// Present when interception is installed.
    pub interceptor: Option<Arc<crate::intercept::Interceptor>>,
}

/// Where an accepted connection goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// What the client dialled.
    pub destination: SocketAddr,
    /// Where the agent connects.
    pub upstream: SocketAddr,
}

/// Who the connection was admitted as.
#[derive(Debug, Clone, Default)]
pub struct Admitted {
    pub grant_id: u64,
    pub subject: String,
    pub expires: Option<SystemTime>,
    /// `proxy_common::session::AUTH_*`.
    pub auth_method: u16,
    pub claims: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Admitted {
    /// A connection that needs no authentication (a static forward).
    #[must_use]
    pub fn unauthenticated() -> Self {
        Self {
            auth_method: AUTH_NONE,
            ..Self::default()
        }
    }
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

/// Opens the upstream connection, marked so interception leaves it alone.
pub async fn connect_upstream(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
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
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ConnectError::Connect { addr, source }),
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
    }
}

fn base_event(
    kind: EventKind,
    client: SocketAddr,
    target: &Target,
    admitted: &Admitted,
) -> AuditEvent {
    let mut event = AuditEvent::new(kind, client.to_string(), target.destination.to_string());
    event.upstream = Some(target.upstream.to_string());
    if admitted.grant_id != 0 {
        event.grant_id = Some(format!("{:016x}", admitted.grant_id));
    }
    if !admitted.subject.is_empty() {
        event.subject = Some(admitted.subject.clone());
    }
    event.claims.clone_from(&admitted.claims);
    event
}

/// Refuses a connection: RST to the client and one audit line.
pub fn deny(
    services: &Services,
    client: &TcpStream,
    peer: SocketAddr,
    target: &Target,
    reason: &str,
    detail: String,
) {
    tracing::info!(client = %peer, destination = %target.destination, reason, %detail, "connection denied");
    let _ = sockopt::set_linger_zero(client.as_fd());
    let mut event = base_event(
        EventKind::ConnectionDenied,
        peer,
        target,
        &Admitted::default(),
    );
    event.reason = Some(reason.to_owned());
    event.detail = Some(detail);
    services.audit.record(event);
}

/// Serves one admitted connection to its end.
pub async fn serve(
    services: Arc<Services>,
    client: TcpStream,
    peer: SocketAddr,
    target: Target,
    admitted: Admitted,
) {
    let Some(mut admission) = services.registry.admit() else {
        let limit = services.registry.capacity();
        deny(
            &services,
            &client,
            peer,
            &target,
            "session_limit",
            format!("{limit} sessions already live"),
        );
        return;
    };
    let started = SystemTime::now();
    let clock = Instant::now();
    let upstream = match connect_upstream(
        target.upstream,
        services.upstream_mark,
        services.connect_timeout,
    )
    .await
    {
        Ok(stream) => stream,
        Err(e) => {
            let detail = crate::error_chain(&e);
            tracing::warn!(client = %peer, upstream = %target.upstream, error = %detail, "upstream unreachable");
            let _ = sockopt::set_linger_zero(client.as_fd());
            let mut event = base_event(EventKind::SessionClose, peer, &target, &admitted);
            event.session_id = Some(format!("{:016x}", admission.id()));
            event.reason = Some("upstream_unreachable".into());
            event.detail = Some(detail);
            event.duration_ms = Some(duration_ms(clock.elapsed()));
            services.audit.record(event);
            return;
        }
    };
    let meta = SessionMeta {
        id: admission.id(),
        grant_id: admitted.grant_id,
        started,
        expires: admitted.expires,
        client: peer,
        destination: target.destination,
        upstream: target.upstream,
        auth_method: admitted.auth_method,
        subject: admitted.subject.clone(),
    };
    let stop = admission.register(meta.clone());
    let mut open = base_event(EventKind::SessionOpen, peer, &target, &admitted);
    open.session_id = Some(format!("{:016x}", meta.id));
    open.datapath = Some(services.datapath.kind().as_str());
    services.audit.record(open);
    tracing::debug!(session = meta.id, client = %peer, upstream = %target.upstream, "session spliced");

    let outcome = services
        .datapath
        .splice(&meta, client, upstream, stop)
        .await;
    drop(admission);
    services.audit.record(close_event(
        &meta,
        &target,
        &admitted,
        &outcome,
        clock.elapsed(),
    ));
    tracing::debug!(
        session = meta.id,
        reason = outcome.reason.as_str(),
        "session ended"
    );
}

fn close_event(
    meta: &SessionMeta,
    target: &Target,
    admitted: &Admitted,
    outcome: &SpliceOutcome,
    elapsed: Duration,
) -> AuditEvent {
    let mut event = base_event(EventKind::SessionClose, meta.client, target, admitted);
    event.session_id = Some(format!("{:016x}", meta.id));
    event.datapath = Some(outcome.datapath.as_str());
    event.bytes_up = Some(outcome.up.total_bytes());
    event.bytes_down = Some(outcome.down.total_bytes());
    event.kernel_bytes_up = Some(outcome.up.kernel_bytes);
    event.kernel_bytes_down = Some(outcome.down.kernel_bytes);
    event.userspace_bytes_up = Some(outcome.up.userspace_bytes);
    event.userspace_bytes_down = Some(outcome.down.userspace_bytes);
    if let Some((up, down)) = outcome.queued_at_splice {
        event.early_bytes_up = Some(up);
        event.early_bytes_down = Some(down);
    }
    event.duration_ms = Some(duration_ms(elapsed));
    event.reason = Some(outcome.reason.as_str().to_owned());
    event.detail.clone_from(&outcome.detail);
    event
}

fn duration_ms(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}
