//! What the flow watch knows of each routed flow it wrote an open line
//! for, put together from the programs' events and whole reads of
//! `FLOWS`, and the flow's audit lines.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use proxy_common::routed::{
    FLOW_FIN_DOWN, FLOW_FIN_UP, FLOW_OPEN, FLOW_RST, FLOW_SEEN_DOWN, FLOW_TOKEN, FlowKey, FlowValue,
};

use super::flows::{DATAPATH, TOKEN_DETAIL, session_id};
use crate::audit::{AuditEvent, EventKind, socket_addr_v4};
use crate::auth::{Grant, GrantId};
use crate::datapath::EndReason;

/// A flow the agent has written a `session_open` for.
pub(super) struct Known {
    session_id: u64,
    /// The grant the tc program admitted the SYN under.
    grant_id: u64,
    opened: SystemTime,
    grant: Option<Arc<Grant>>,
    /// Opened under a previous agent and carried over at start.
    adopted: bool,
    /// When and why it ended; removed `linger` later.
    ended: Option<(Instant, EndReason)>,
    /// Its entry, newest seen: its SYN's time tells it from a new flow on
    /// the same 4-tuple, and its counters close it.
    last: FlowValue,
}

/// Why a flow that was not ended by the agent is over, if it is.
pub(super) enum Over {
    /// The agent ends it: the programs drop what follows, RSTs both ways.
    End(EndReason),
    /// Both ends finished it, or the target never answered: it only
    /// lingers for its last packets.
    Finished(EndReason),
}

impl Known {
    pub fn new(key: &FlowKey, flow: FlowValue, grant: Option<Arc<Grant>>, adopted: bool) -> Self {
        Self {
            session_id: session_id(key, flow.opened_mono_ns),
            grant_id: flow.grant_id,
            opened: SystemTime::now(),
            grant,
            adopted,
            ended: None,
            last: flow,
        }
    }

    #[must_use]
    pub fn grant_id(&self) -> GrantId {
        GrantId(self.grant_id)
    }

    /// The monotonic time of its SYN: a later one on the same 4-tuple is a
    /// new flow, an earlier one a stale look at a flow already replaced.
    #[must_use]
    pub fn opened_mono_ns(&self) -> u64 {
        self.last.opened_mono_ns
    }

    /// Takes in another look at the same flow. Looks may arrive out of
    /// order (events from two CPUs, a whole read between them): counters
    /// come from the look that saw the most packets, flags only gain bits
    /// and a state that left `FLOW_OPEN` never returns to it.
    pub fn merge(&mut self, flow: &FlowValue) {
        let seen = |f: &FlowValue| f.packets_up + f.packets_down + f.dropped;
        let state = if self.last.state == FLOW_OPEN {
            flow.state
        } else {
            self.last.state
        };
        let flags = self.last.flags | flow.flags;
        if seen(flow) >= seen(&self.last) {
            self.last = *flow;
        }
        self.last.state = state;
        self.last.flags = flags;
        self.revive_if_answered();
    }

    /// Taken as finished because its target has not answered (and still
    /// has not, as far as the agent knows).
    #[must_use]
    pub fn is_unanswered(&self) -> bool {
        self.finished_unanswered() && self.last.flags & FLOW_SEEN_DOWN == 0
    }

    /// Finished for want of an answer, and not closed by either end since.
    fn finished_unanswered(&self) -> bool {
        matches!(self.ended, Some((_, EndReason::UpstreamUnreachable))) && !closed(&self.last)
    }

    /// A flow taken as finished because its target had not answered
    /// within `linger`, answered since (a retransmitted SYN, after the
    /// target dropped the first as a full listen queue does), is live
    /// again: its entry must stay, or the established connection's next
    /// packet finds none and the intercepting path resets it. Nothing of
    /// its end was written yet (that waits for the removal).
    fn revive_if_answered(&mut self) {
        if self.finished_unanswered()
            && self.last.state == FLOW_OPEN
            && self.last.flags & FLOW_SEEN_DOWN != 0
        {
            self.ended = None;
        }
    }

    /// Refused for a token preamble.
    #[must_use]
    pub fn is_token(&self) -> bool {
        self.last.state == FLOW_TOKEN
    }

    #[must_use]
    pub fn is_ended(&self) -> bool {
        self.ended.is_some()
    }

    /// Ended at least `linger` ago: its entry can go.
    #[must_use]
    pub fn lingered(&self, linger: Duration) -> bool {
        self.ended.is_some_and(|(at, _)| at.elapsed() >= linger)
    }

    pub fn end(&mut self, reason: EndReason) {
        self.ended.get_or_insert((Instant::now(), reason));
    }

    /// Bytes counted so far (up, down).
    #[must_use]
    pub fn bytes(&self) -> (u64, u64) {
        (self.last.bytes_up, self.last.bytes_down)
    }

    /// Whether the flow is over and why: `grant_live` says whether its
    /// grant still is, `shutdown` that the agent is stopping, `linger` how
    /// long a target may take to answer the SYN.
    #[must_use]
    pub fn over(&self, grant_live: bool, shutdown: bool, linger: Duration) -> Option<Over> {
        let flow = &self.last;
        if flow.state == FLOW_TOKEN {
            return Some(Over::End(EndReason::AuthFailed));
        }
        if flow.state != FLOW_OPEN {
            return Some(Over::End(EndReason::GrantExpired));
        }
        if shutdown {
            return Some(Over::End(EndReason::AgentShutdown));
        }
        if !grant_live {
            let now = SystemTime::now();
            let expired = self.grant.as_ref().is_some_and(|g| g.expires_at <= now);
            return Some(Over::End(if expired {
                EndReason::GrantExpired
            } else {
                EndReason::Revoked
            }));
        }
        let unanswered = flow.flags & FLOW_SEEN_DOWN == 0
            && super::sources::monotonic_ns().saturating_sub(flow.opened_mono_ns)
                > u64::try_from(linger.as_nanos()).unwrap_or(u64::MAX);
        (closed(flow) || unanswered).then(|| Over::Finished(self.finish_reason()))
    }

    /// Who finished the flow, by its flags.
    fn finish_reason(&self) -> EndReason {
        if self.last.flags & FLOW_SEEN_DOWN == 0 {
            EndReason::UpstreamUnreachable
        } else {
            self.closer()
        }
    }

    fn closer(&self) -> EndReason {
        if self.last.flags & FLOW_FIN_UP != 0 {
            EndReason::ClientClosed
        } else {
            EndReason::UpstreamClosed
        }
    }

    /// Why it closed (a flow replaced before it was seen to finish: who
    /// sent the first FIN), and its grant's expiry if that closed it.
    #[must_use]
    pub fn close_reason(&self) -> (EndReason, Option<SystemTime>) {
        let reason = self.ended.map_or_else(|| self.closer(), |(_, r)| r);
        let expired_at = (reason == EndReason::GrantExpired)
            .then(|| self.grant.as_ref().map(|g| g.expires_at))
            .flatten();
        (reason, expired_at)
    }

    /// Its `session_open` or `session_close` line.
    #[must_use]
    pub fn line(&self, kind: EventKind, key: &FlowKey) -> AuditEvent {
        let runner = SocketAddrV4::new(key.runner_addr.into(), key.runner_port);
        let target = socket_addr_v4(SocketAddrV4::new(key.target_addr.into(), key.target_port));
        let mut event = AuditEvent::new(kind, socket_addr_v4(runner), target.clone());
        event.upstream = Some(target);
        event.session_id = Some(format!("{:016x}", self.session_id));
        event.datapath = Some(DATAPATH);
        if self.adopted {
            event.handover = Some(crate::audit::Handover::Adopted);
        }
        // The grant may be gone already (revoked before the first poll):
        // its id is still the flow's.
        event.grant_id = Some(self.grant_id().to_string());
        if let Some(grant) = &self.grant {
            event.subject = Some(grant.subject.clone());
            event.claims = grant.audit_claims.clone();
        }
        if kind == EventKind::SessionClose {
            let flow = &self.last;
            event.bytes_up = Some(flow.bytes_up);
            event.bytes_down = Some(flow.bytes_down);
            event.kernel_bytes_up = Some(flow.bytes_up);
            event.kernel_bytes_down = Some(flow.bytes_down);
            event.duration_ms = self
                .opened
                .elapsed()
                .ok()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            event.reason = self.ended.map(|(_, r)| r.as_str().to_owned());
            if flow.state == FLOW_TOKEN {
                event.detail = Some(TOKEN_DETAIL.to_owned());
            }
        }
        event
    }
}

/// Both ends finished it: FINs both ways, or a reset.
fn closed(flow: &FlowValue) -> bool {
    flow.flags & FLOW_RST != 0
        || flow.flags & (FLOW_FIN_UP | FLOW_FIN_DOWN) == FLOW_FIN_UP | FLOW_FIN_DOWN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unanswered_flow() -> (FlowKey, FlowValue) {
        let key = FlowKey {
            runner_addr: [198, 51, 100, 7],
            target_addr: [192, 0, 2, 10],
            runner_port: 40_000,
            target_port: 5432,
        };
        // Opened at boot: long past any linger.
        let flow = FlowValue {
            opened_mono_ns: 1,
            state: FLOW_OPEN,
            ..FlowValue::default()
        };
        (key, flow)
    }

    #[test]
    fn an_unanswered_flow_answered_before_its_removal_is_live_again() {
        let (key, flow) = unanswered_flow();
        let mut known = Known::new(&key, flow, None, false);
        let Some(Over::Finished(reason)) = known.over(true, false, Duration::ZERO) else {
            panic!("an unanswered flow is finished after linger");
        };
        assert_eq!(reason, EndReason::UpstreamUnreachable);
        known.end(reason);
        assert!(known.lingered(Duration::ZERO), "due for removal");
        assert!(known.is_unanswered(), "swept only while unanswered");

        // The target answers a retransmitted SYN.
        known.merge(&FlowValue {
            flags: FLOW_SEEN_DOWN,
            packets_up: 2,
            packets_down: 1,
            ..flow
        });

        assert!(!known.is_ended(), "live again");
        assert!(!known.is_unanswered());
        assert!(!known.lingered(Duration::ZERO), "its entry stays");
        assert!(known.over(true, false, Duration::ZERO).is_none());
    }

    #[test]
    fn a_flow_its_ends_closed_stays_finished_whatever_comes_after() {
        let (key, flow) = unanswered_flow();
        let closed = FlowValue {
            flags: FLOW_SEEN_DOWN | FLOW_FIN_UP | FLOW_FIN_DOWN,
            ..flow
        };
        let mut known = Known::new(&key, closed, None, false);
        let Some(Over::Finished(reason)) = known.over(true, false, Duration::ZERO) else {
            panic!("closed by both ends");
        };
        known.end(reason);
        known.merge(&FlowValue {
            packets_up: 9,
            ..closed
        });
        assert!(known.is_ended() && known.lingered(Duration::ZERO));

        // Reset before any answer: not revived by a late SYN-ACK either.
        let (key, flow) = unanswered_flow();
        let reset = FlowValue {
            flags: FLOW_RST,
            ..flow
        };
        let mut known = Known::new(&key, reset, None, false);
        known.end(EndReason::UpstreamUnreachable);
        known.merge(&FlowValue {
            flags: FLOW_RST | FLOW_SEEN_DOWN,
            ..reset
        });
        assert!(known.is_ended(), "a reset flow stays over");
        assert!(!known.is_unanswered(), "swept whatever its flags");
    }
}
