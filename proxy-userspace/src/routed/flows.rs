//! The agent's side of routed flows: every `poll_interval` it syncs the
//! routed sources, takes in the programs' events (and, now and then or
//! when events were lost, every entry of `FLOWS`), writes each new flow's
//! `session_open`, ends flows whose grant expired or was revoked (mark
//! ended, RSTs both ways), and after `linger` removes finished flows with
//! their `session_close` line and kernel counters.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use proxy_common::routed::{FlowKey, FlowValue, SweepEntry};
use tokio::sync::watch;

use super::Router;
use super::events::{FlowChange, FlowEvents};
use super::known::{Known, Over};
use super::rst::RstSender;
use crate::audit::{AuditLog, EventKind};
use crate::auth::GrantId;
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

/// Time between whole reads of `FLOWS` when no record was lost: they
/// refresh the byte counts of long flows (for the metrics) and are a
/// safety net. With the default 100 ms polls, one poll in ten reads it.
const READ_WHOLE_EVERY: Duration = Duration::from_secs(1);

/// Learns of flows every `poll_interval` until `stop`, then ends every
/// flow left.
pub struct FlowWatch {
    router: Arc<Router>,
    gate: Arc<Gate>,
    audit: AuditLog,
    rst: Option<RstSender>,
    metrics: super::metrics::RoutedMetrics,
    known: HashMap<FlowKey, Known>,
    /// Bytes of the flows removed so far (up, down), for the totals.
    removed_bytes: (u64, u64),
    /// Reads `FLOWS` whole, keeping its buffers from one read to the next.
    reader: crate::map_batch::BatchReader<FlowKey, FlowValue>,
    /// The programs' events; without them every poll reads `FLOWS` whole.
    events: Option<FlowEvents>,
    /// `events_lost` of the programs' counters at the last poll.
    lost: u64,
    /// When `FLOWS` was last read whole (never: at the next poll).
    read_whole_at: Option<Instant>,
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
        let events = router.take_events();
        Self {
            router,
            gate,
            audit,
            rst,
            metrics,
            known: HashMap::new(),
            removed_bytes: (0, 0),
            reader: crate::map_batch::BatchReader::default(),
            events,
            lost: 0,
            read_whole_at: None,
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
        let grants = if shutdown {
            Vec::new()
        } else {
            self.gate.grants()
        };
        self.router.sync_grants(&grants);
        let stats = self.router.stats();
        let lost = std::mem::replace(&mut self.lost, stats.events_lost) != stats.events_lost;
        self.take_events();
        // Read after the lost count: a record lost since is caught by the
        // next poll's read.
        let due = self
            .read_whole_at
            .is_none_or(|at| at.elapsed() >= READ_WHOLE_EVERY);
        if shutdown || lost || due || self.events.is_none() {
            self.read_whole();
            self.read_whole_at = Some(Instant::now());
        }
        self.metrics.update(&stats, self.known.len());
        self.settle(shutdown);
    }

    /// Takes in the programs' queued events.
    fn take_events(&mut self) {
        let Some(mut events) = self.events.take() else {
            return;
        };
        events.drain(|change, key, flow| {
            // A change of a flow not known is of one removed already (its
            // last packets), or its opening was lost and a whole read
            // follows: no open line from it.
            if change == FlowChange::Opened || self.known.contains_key(&key) {
                self.observe(key, flow);
            }
        });
        self.events = Some(events);
    }

    /// Takes in every entry of `FLOWS`.
    fn read_whole(&mut self) {
        // Taken out for the read, so its entries can be walked while the
        // watch changes; put back with its buffers after it.
        let mut flows = std::mem::take(&mut self.reader);
        {
            let map = self
                .router
                .flows
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = flows.read(&*map) {
                tracing::warn!(error = %crate::error_chain(&e), "cannot read the routed flows map");
            }
        }
        for (key, flow) in flows.entries() {
            self.observe(key, flow);
        }
        self.reader = flows;
    }

    /// Takes in a look at a flow: a new flow gets its open line; a new SYN
    /// on a known flow's 4-tuple closes the known one first.
    fn observe(&mut self, key: FlowKey, flow: FlowValue) {
        if flow.is_removed() {
            // A finished flow the sweep (or a new SYN) is taking out.
            return;
        }
        if let Some(known) = self.known.get_mut(&key) {
            match flow.opened_mono_ns.cmp(&known.opened_mono_ns()) {
                std::cmp::Ordering::Equal => return known.merge(&flow),
                // A look at the flow this one replaced.
                std::cmp::Ordering::Less => return,
                std::cmp::Ordering::Greater => self.close(key),
            }
        }
        let grant = self.gate.grant(GrantId(flow.grant_id));
        let known = Known::new(&key, flow, grant, self.router.take_carried(&key));
        self.audit.record(known.line(EventKind::SessionOpen, &key));
        self.metrics.opened();
        self.known.insert(key, known);
    }

    /// Ends the flows whose grant went or that the programs ended, notes
    /// those both ends finished, and removes those ended `linger` ago.
    fn settle(&mut self, shutdown: bool) {
        let now = SystemTime::now();
        let mut to_end = Vec::new();
        let mut live = 0;
        for (key, known) in &mut self.known {
            if known.is_ended() {
                continue;
            }
            let grant_live = self
                .gate
                .grant_expires_at(known.grant_id())
                .is_some_and(|expires_at| expires_at > now);
            match known.over(grant_live, shutdown, self.router.section.linger) {
                Some(Over::End(reason)) => {
                    known.end(reason);
                    to_end.push(*key);
                }
                Some(Over::Finished(reason)) => known.end(reason),
                None => live += 1,
            }
        }
        for key in to_end {
            let Some(known) = self.known.get_mut(&key) else {
                continue;
            };
            if known.is_token() {
                tracing::warn!(runner = %SocketAddrV4::new(key.runner_addr.into(), key.runner_port), "a token preamble on a routed flow: reset, the token did not reach the target");
            }
            // Its counters as it ended: the programs count nothing more.
            let opened = known.opened_mono_ns();
            if let Some(flow) = super::ending::end(&self.router, self.rst.as_ref(), key, opened) {
                known.merge(&flow);
            }
        }
        self.remove_lingered(shutdown);
        let (mut up, mut down) = self.removed_bytes;
        for known in self.known.values() {
            let (u, d) = known.bytes();
            up += u;
            down += d;
        }
        self.metrics.progress(live, up, down);
    }

    /// Removes the flows ended `linger` ago (all at a stop) from `FLOWS`,
    /// at once, and writes their close lines with the counters last seen:
    /// final, since the programs count nothing of an ended flow. The sweep
    /// program removes an entry only while it is still that flow: a new
    /// SYN on the 4-tuple since the last look keeps its entry, and its
    /// opening comes with the next poll's events. A flow taken as
    /// unanswered goes only while its target still has not answered.
    fn remove_lingered(&mut self, shutdown: bool) {
        let linger = if shutdown {
            Duration::ZERO
        } else {
            self.router.section.linger
        };
        self.take_events();
        let entries: Vec<SweepEntry> = self
            .known
            .iter()
            .filter(|(_, known)| known.lingered(linger))
            .map(|(key, known)| {
                let entry = SweepEntry::new(*key, known.opened_mono_ns());
                // At a stop every flow goes, answered or not.
                if known.is_unanswered() && !shutdown {
                    entry.if_unanswered()
                } else {
                    entry
                }
            })
            .collect();
        if entries.is_empty() {
            return;
        }
        let swept = match self.router.edits.remove(&entries) {
            Ok(_) => true,
            Err(e) => {
                // Removed by key instead: a flow that took a 4-tuple since
                // the last look may lose its entry, but none lingers for ever.
                tracing::warn!(error = %crate::error_chain(&e), "removing finished routed flows by key");
                let keys: Vec<FlowKey> = entries.iter().map(|e| e.key).collect();
                let mut map = self
                    .router
                    .flows
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Err(e) = crate::map_batch::delete_all(&mut *map, &keys) {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot remove finished routed flows");
                }
                false
            }
        };
        for entry in entries {
            if swept && entry.only_if_unanswered() && self.answered_since(&entry) {
                continue;
            }
            self.close(entry.key);
        }
    }

    /// Whether the unanswered flow `entry` names is still in `FLOWS`,
    /// answered since the last look (the sweep kept it); if so, takes
    /// that look in, which makes it live again.
    fn answered_since(&mut self, entry: &SweepEntry) -> bool {
        let flow = {
            let map = self
                .router
                .flows
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            map.get(&entry.key, 0).ok()
        };
        let Some(flow) = flow.filter(|f| f.opened_mono_ns == entry.opened_mono_ns) else {
            return false;
        };
        let Some(known) = self.known.get_mut(&entry.key) else {
            return false;
        };
        known.merge(&flow);
        !known.is_ended()
    }

    /// Writes the close line of `key`'s known flow and forgets it.
    fn close(&mut self, key: FlowKey) {
        let Some(mut known) = self.known.remove(&key) else {
            return;
        };
        let (up, down) = known.bytes();
        self.removed_bytes.0 += up;
        self.removed_bytes.1 += down;
        let (reason, expired_at) = known.close_reason();
        known.end(reason);
        self.metrics.closed(reason.as_str(), expired_at);
        self.audit.record(known.line(EventKind::SessionClose, &key));
    }
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
