//! The agent's side of routed flows: every `poll_interval` it syncs the
//! routed sources, reads `FLOWS`, writes each new flow's `session_open`,
//! ends flows whose grant expired or was revoked (mark ended, RSTs both
//! ways), and after `linger` removes finished flows with their
//! `session_close` line and kernel counters.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use proxy_common::routed::{
    FLOW_ENDED, FLOW_FIN_DOWN, FLOW_FIN_UP, FLOW_OPEN, FLOW_RST, FLOW_SEEN_DOWN, FLOW_TOKEN,
    FlowKey, FlowValue,
};
use tokio::sync::watch;

use super::Router;
use super::rst::RstSender;
use super::sources::monotonic_ns;
use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::auth::{Grant, GrantId};
use crate::datapath::EndReason;
use crate::gate::Gate;

/// The `datapath` of routed sessions' audit lines.
pub const DATAPATH: &str = "routed";

/// The close line's `detail` of a flow refused for its preamble.
pub const TOKEN_DETAIL: &str = "token preamble on a routed flow: the runner holds a source grant, so it must connect without a preamble; the token was dropped before the target";

/// A routed flow's session id: derived from what the pinned `FLOWS` entry
/// holds for its whole life (its 5-tuple and the monotonic time of its
/// SYN), so `tcpgate sessions` computes the id the audit lines carry
/// without asking the agent. A reused 5-tuple has another SYN time. FNV-1a
/// over the fields, then the splitmix64 finalizer; never 0. Not a secret:
/// operators see every session id.
#[must_use]
pub fn session_id(key: &FlowKey, opened_mono_ns: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut bytes = [0u8; 20];
    bytes[..4].copy_from_slice(&key.runner_addr);
    bytes[4..8].copy_from_slice(&key.target_addr);
    bytes[8..10].copy_from_slice(&key.runner_port.to_be_bytes());
    bytes[10..12].copy_from_slice(&key.target_port.to_be_bytes());
    bytes[12..].copy_from_slice(&opened_mono_ns.to_be_bytes());
    for byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    hash.max(1)
}

/// A flow the agent has written a `session_open` for.
struct Known {
    session_id: u64,
    /// The grant the tc program admitted the SYN under.
    grant_id: u64,
    opened: SystemTime,
    grant: Option<Grant>,
    /// Opened under a previous agent and carried over at start.
    adopted: bool,
    /// When and why it ended; removed `linger` later.
    ended: Option<(Instant, EndReason)>,
    /// Its entry as last read: its SYN's time tells it from a new flow on
    /// the same 4-tuple, and its counters close it if one replaced it.
    last: FlowValue,
}

/// Polls `FLOWS` until `stop`, then ends every flow left.
pub struct FlowWatch {
    router: Arc<Router>,
    gate: Arc<Gate>,
    audit: AuditLog,
    rst: Option<RstSender>,
    metrics: super::metrics::RoutedMetrics,
    known: HashMap<FlowKey, Known>,
    /// Bytes of the flows removed so far (up, down), for the totals.
    removed_bytes: (u64, u64),
    /// Reads `FLOWS`, keeping its buffers from one poll to the next.
    reader: crate::map_batch::BatchReader<FlowKey, FlowValue>,
}

impl FlowWatch {
    #[must_use]
    pub fn new(
        router: Arc<Router>,
        gate: Arc<Gate>,
        audit: AuditLog,
        upstream_mark: u32,
        metrics: super::metrics::RoutedMetrics,
    ) -> Self {
        let rst = RstSender::new(upstream_mark)
            .inspect_err(
                |e| tracing::error!(error = %e, "no raw socket: routed flows end without RSTs"),
            )
            .ok();
        Self {
            router,
            gate,
            audit,
            rst,
            metrics,
            known: HashMap::new(),
            removed_bytes: (0, 0),
            reader: crate::map_batch::BatchReader::default(),
        }
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.router.section.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() || self.router.is_handed_over() {
                break;
            }
            self.poll(false);
        }
        if self.router.is_handed_over() {
            // The successor carried the flows over; ending them here would
            // reset connections it serves.
            tracing::info!(
                flows = self.known.len(),
                "routed flows handed over to the successor"
            );
            return;
        }
        self.poll(true);
    }

    /// One round; `shutdown` ends every flow now and removes it.
    fn poll(&mut self, shutdown: bool) {
        let now = SystemTime::now();
        let grants = if shutdown {
            Vec::new()
        } else {
            self.gate.grants()
        };
        self.router.sync_grants(&grants);
        // Taken out for the round, so its entries can be walked while the
        // watch changes; put back with its buffers after it.
        let mut flows = std::mem::take(&mut self.reader);
        let count = {
            let map = self
                .router
                .flows
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            flows.read(&*map).unwrap_or_else(|e| {
                tracing::warn!(error = %crate::error_chain(&e), "cannot read the routed flows map");
                0
            })
        };
        let linger = if shutdown {
            Duration::ZERO
        } else {
            self.router.section.linger
        };
        self.metrics.update(&self.router.stats(), count);
        let mut kept_bytes = (0u64, 0u64);
        for (key, flow) in flows.entries() {
            let replaced = self
                .known
                .get(&key)
                .is_some_and(|k| k.last.opened_mono_ns != flow.opened_mono_ns);
            if replaced {
                // A new SYN on a finished flow's 4-tuple took its entry.
                self.close(key, None);
            }
            self.observe(key, flow, now, shutdown);
            let done = self
                .known
                .get(&key)
                .and_then(|k| k.ended)
                .is_some_and(|(at, _)| at.elapsed() >= linger);
            if done {
                self.remove(key);
            } else {
                kept_bytes.0 += flow.bytes_up;
                kept_bytes.1 += flow.bytes_down;
            }
        }
        self.reader = flows;
        let live = self.known.values().filter(|k| k.ended.is_none()).count();
        let (up, down) = self.removed_bytes;
        self.metrics
            .progress(live, up + kept_bytes.0, down + kept_bytes.1);
    }

    /// Writes the open line of a new flow, and notes when and why it ends.
    fn observe(&mut self, key: FlowKey, flow: FlowValue, now: SystemTime, shutdown: bool) {
        let known = self.known.entry(key).or_insert_with(|| {
            let grant = self.gate.grant(GrantId(flow.grant_id));
            let known = Known {
                session_id: session_id(&key, flow.opened_mono_ns),
                grant_id: flow.grant_id,
                opened: now,
                grant,
                adopted: self.router.take_carried(&key),
                ended: None,
                last: flow,
            };
            self.audit
                .record(event(EventKind::SessionOpen, key, &known, None));
            self.metrics.opened();
            known
        });
        known.last = flow;
        if known.ended.is_some() {
            return;
        }
        let grant_live = self
            .gate
            .grant_expires_at(GrantId(flow.grant_id))
            .is_some_and(|expires_at| expires_at > now);
        let reason = if flow.state == FLOW_TOKEN {
            tracing::warn!(runner = %SocketAddrV4::new(key.runner_addr.into(), key.runner_port), "a token preamble on a routed flow: reset, the token did not reach the target");
            Some(EndReason::AuthFailed)
        } else if flow.state != FLOW_OPEN {
            Some(EndReason::GrantExpired)
        } else if shutdown {
            Some(EndReason::AgentShutdown)
        } else if !grant_live {
            let expired = known.grant.as_ref().is_some_and(|g| g.expires_at <= now);
            Some(if expired {
                EndReason::GrantExpired
            } else {
                EndReason::Revoked
            })
        } else {
            None
        };
        if let Some(reason) = reason {
            known.ended = Some((Instant::now(), reason));
            end(&self.router, self.rst.as_ref(), key);
            return;
        }
        let closed = flow.flags & FLOW_RST != 0
            || flow.flags & (FLOW_FIN_UP | FLOW_FIN_DOWN) == FLOW_FIN_UP | FLOW_FIN_DOWN;
        let unanswered = flow.flags & FLOW_SEEN_DOWN == 0
            && monotonic_ns().saturating_sub(flow.opened_mono_ns)
                > u64::try_from(self.router.section.linger.as_nanos()).unwrap_or(u64::MAX);
        if closed || unanswered {
            let reason = if flow.flags & FLOW_SEEN_DOWN == 0 {
                EndReason::UpstreamUnreachable
            } else if flow.flags & FLOW_FIN_UP != 0 {
                EndReason::ClientClosed
            } else {
                EndReason::UpstreamClosed
            };
            known.ended = Some((Instant::now(), reason));
        }
    }

    /// Removes a finished flow and writes its close line.
    fn remove(&mut self, key: FlowKey) {
        let opened = self.known.get(&key).map(|k| k.last.opened_mono_ns);
        let flow = {
            let mut map = self
                .router
                .flows
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Not a new flow that took the 4-tuple since the last read.
            let flow = map
                .get(&key, 0)
                .ok()
                .filter(|f| Some(f.opened_mono_ns) == opened);
            if flow.is_some() {
                let _ = map.remove(&key);
            }
            flow
        };
        self.close(key, flow);
    }

    /// Writes the close line of `key`'s known flow, with its final entry
    /// (else the last one read), and forgets it.
    fn close(&mut self, key: FlowKey, flow: Option<FlowValue>) {
        let Some(known) = self.known.remove(&key) else {
            return;
        };
        let flow = flow.unwrap_or(known.last);
        self.removed_bytes.0 += flow.bytes_up;
        self.removed_bytes.1 += flow.bytes_down;
        // Replaced before a poll saw it finish: its flags say who closed.
        let reason = known.ended.map_or(
            if flow.flags & FLOW_FIN_UP != 0 {
                EndReason::ClientClosed
            } else {
                EndReason::UpstreamClosed
            },
            |(_, r)| r,
        );
        let expired_at = (reason == EndReason::GrantExpired)
            .then(|| known.grant.as_ref().map(|g| g.expires_at))
            .flatten();
        self.metrics.closed(reason.as_str(), expired_at);
        self.audit
            .record(event(EventKind::SessionClose, key, &known, Some(&flow)));
    }
}

/// Marks a flow ended (the programs drop what follows) and resets both
/// ends with the sequence numbers the programs tracked.
fn end(router: &Router, rst: Option<&RstSender>, key: FlowKey) {
    let flow = {
        let mut map = router.flows.lock().unwrap_or_else(PoisonError::into_inner);
        let Ok(mut flow) = map.get(&key, 0) else {
            return;
        };
        if flow.state == FLOW_OPEN {
            flow.state = FLOW_ENDED;
            if let Err(e) = map.insert(key, flow, 0) {
                tracing::error!(error = %e, "cannot mark a routed flow ended");
            }
        }
        flow
    };
    let Some(rst) = rst else { return };
    let runner = SocketAddrV4::new(key.runner_addr.into(), key.runner_port);
    let target = SocketAddrV4::new(key.target_addr.into(), key.target_port);
    let fin = |flag| u32::from(flow.flags & flag != 0);
    let up = flow.next_seq_up.wrapping_add(fin(FLOW_FIN_UP));
    if let Err(e) = rst.send(runner, target, up) {
        tracing::warn!(error = %e, "cannot reset a routed flow's target");
    }
    if flow.flags & FLOW_SEEN_DOWN != 0 {
        let down = flow.next_seq_down.wrapping_add(fin(FLOW_FIN_DOWN));
        if let Err(e) = rst.send(target, runner, down) {
            tracing::warn!(error = %e, "cannot reset a routed flow's runner");
        }
    }
}

fn event(kind: EventKind, key: FlowKey, known: &Known, flow: Option<&FlowValue>) -> AuditEvent {
    let runner = SocketAddrV4::new(key.runner_addr.into(), key.runner_port);
    let target = SocketAddrV4::new(key.target_addr.into(), key.target_port);
    let mut event = AuditEvent::new(kind, runner.to_string(), target.to_string());
    event.upstream = Some(target.to_string());
    event.session_id = Some(format!("{:016x}", known.session_id));
    event.datapath = Some(DATAPATH);
    if known.adopted {
        event.handover = Some(crate::audit::Handover::Adopted);
    }
    // The grant may be gone already (revoked before the first poll): its
    // id is still the flow's.
    event.grant_id = Some(GrantId(known.grant_id).to_string());
    if let Some(grant) = &known.grant {
        event.subject = Some(grant.subject.clone());
        event.claims = std::sync::Arc::clone(&grant.audit_claims);
    }
    if kind == EventKind::SessionClose {
        let flow = flow.copied().unwrap_or_default();
        event.bytes_up = Some(flow.bytes_up);
        event.bytes_down = Some(flow.bytes_down);
        event.kernel_bytes_up = Some(flow.bytes_up);
        event.kernel_bytes_down = Some(flow.bytes_down);
        event.duration_ms = known
            .opened
            .elapsed()
            .ok()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        event.reason = known.ended.map(|(_, r)| r.as_str().to_owned());
        if flow.state == FLOW_TOKEN {
            event.detail = Some(TOKEN_DETAIL.to_owned());
        }
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_session_id_depends_on_the_tuple_and_the_syn_time_only() {
        let key = FlowKey {
            runner_addr: [198, 51, 100, 7],
            target_addr: [192, 0, 2, 10],
            runner_port: 40_000,
            target_port: 5432,
        };
        let id = session_id(&key, 1_000);
        assert_eq!(id, session_id(&key, 1_000), "deterministic");
        // Pinned: the CLI of another build must compute the same id.
        assert_eq!(format!("{id:016x}"), "8cd2722a5e8eb6b9");
        assert_ne!(id, session_id(&key, 1_001), "a reused tuple");
        let other = FlowKey {
            runner_port: 40_001,
            ..key
        };
        assert_ne!(id, session_id(&other, 1_000));
    }
}
