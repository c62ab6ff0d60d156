//! The audit lines a session writes: `session_open`, `session_close`, and
//! the fields every line of a connection shares.

use super::*;

pub(super) fn base_event(
    kind: EventKind,
    client: SocketAddr,
    target: &Target,
    admitted: &Admitted,
) -> AuditEvent {
    let mut event = AuditEvent::new(
        kind,
        crate::audit::socket_addr(client),
        crate::audit::socket_addr(target.destination),
    );
    event.upstream = Some(crate::audit::socket_addr(target.upstream));
    if admitted.grant_id != 0 {
        event.grant_id = Some(GrantId(admitted.grant_id).to_string());
    }
    if !admitted.subject.is_empty() {
        event.subject = Some(admitted.subject.to_string());
    }
    event.claims = admitted.claims.clone();
    event
}

/// The `session_open` line. Built outside `serve` so the event's storage
/// is not kept in every live session's future.
pub(super) fn record_open(
    services: &Services,
    meta: &SessionMeta,
    target: &Target,
    admitted: &Admitted,
) {
    let mut open = base_event(EventKind::SessionOpen, meta.client, target, admitted);
    open.session_id = Some(format!("{:016x}", meta.id));
    open.datapath = Some(services.datapath.kind().as_str());
    services.audit.record(open);
}

/// A session that ended, for its metrics and its close line.
pub(super) struct Ending<'a> {
    pub meta: &'a SessionMeta,
    pub target: &'a Target,
    pub admitted: &'a Admitted,
    pub elapsed: Duration,
    /// Set by a successor that adopted the session.
    pub handover: Option<crate::audit::Handover>,
}

impl Ending<'_> {
    /// Counts the session's bytes, frees its slot and writes its close
    /// line.
    pub fn record(
        &self,
        services: &Services,
        mut outcome: SpliceOutcome,
        admission: crate::registry::Admission,
    ) {
        revoked_outside(services, self.meta, &mut outcome);
        outcome.down.userspace_bytes += self.admitted.relayed_down;
        // Before the slot is released, so a scrape never misses these
        // bytes for long (see `Metrics::render`).
        services.metrics.session_closed(
            outcome.reason.as_str(),
            &outcome.up,
            &outcome.down,
            (outcome.reason == EndReason::GrantExpired)
                .then_some(self.meta.expires)
                .flatten(),
        );
        drop(admission);
        release_grant(services, self.admitted);
        let mut event = close_event(
            self.meta,
            self.target,
            self.admitted,
            &outcome,
            self.elapsed,
        );
        event.handover = self.handover;
        services.audit.record(event);
        tracing::debug!(session = %format_args!("{:016x}", self.meta.id), reason = outcome.reason.as_str(), "session ended");
    }
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
    if outcome.datapath == crate::datapath::DatapathKind::Ebpf {
        event.backpressure_bytes_up = Some(outcome.up.passed_bytes);
        event.backpressure_bytes_down = Some(outcome.down.passed_bytes);
        event.backpressure_handbacks_up = Some(outcome.up.handbacks);
        event.backpressure_handbacks_down = Some(outcome.down.handbacks);
    }
    if let Some((up, down)) = outcome.queued_at_splice {
        event.early_bytes_up = Some(up);
        event.early_bytes_down = Some(down);
    }
    event.duration_ms = Some(duration_ms(elapsed));
    event.reason = Some(outcome.reason.as_str().to_owned());
    event.detail.clone_from(&outcome.detail);
    event
}

pub(super) fn duration_ms(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}
