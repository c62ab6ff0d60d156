//! Routed grants' metrics, updated by the flow watch at each poll: their
//! own (`routed_*`), and the agent's session metrics, so routed flows
//! count in `sessions_live`, `connections_accepted`, `sessions_closed`,
//! `expiry_teardown_seconds` and `bytes{path="routed"}` like any session.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proxy_common::routed::RoutedStats;

#[derive(Debug, Default, Clone)]
pub struct RoutedMetrics {
    flows: Gauge,
    capacity: Gauge,
    opened: Counter,
    full: Counter,
    forged: Counter,
    dropped: Counter,
    preambles: Counter,
    events_lost: Counter,
    polls: Counter,
    /// The agent's metrics, once shared.
    agent: Option<Arc<crate::metrics::Metrics>>,
}

impl RoutedMetrics {
    pub fn register(&self, registry: &mut Registry, max_flows: u32) {
        self.capacity.set(i64::from(max_flows));
        registry.register(
            "routed_flows",
            "Routed flows in FLOWS as the agent last saw them (open, or ended and lingering)",
            self.flows.clone(),
        );
        registry.register(
            "routed_flows_capacity",
            "intercept.routed_grants.max_flows",
            self.capacity.clone(),
        );
        registry.register(
            "routed_flows_opened",
            "Granted SYNs the tc program started a routed flow for",
            self.opened.clone(),
        );
        registry.register(
            "routed_flows_full",
            "Granted SYNs left to the intercepting path because FLOWS was full",
            self.full.clone(),
        );
        registry.register(
            "routed_forged_marks",
            "Packets that arrived carrying the routed mark (cleared)",
            self.forged.clone(),
        );
        registry.register(
            "routed_dropped_packets",
            "Packets of ended routed flows dropped by the tc programs",
            self.dropped.clone(),
        );
        registry.register(
            "routed_preambles_refused",
            "Routed flows reset because the runner sent a token preamble on them",
            self.preambles.clone(),
        );
        registry.register(
            "routed_events_lost",
            "Flow events the tc programs had no room for in FLOW_EVENTS (the agent then reads FLOWS whole)",
            self.events_lost.clone(),
        );
        registry.register(
            "routed_polls",
            "Rounds of the agent's flow watch (one per poll_interval)",
            self.polls.clone(),
        );
    }

    /// Routed flows count in the agent's session metrics from now on.
    pub fn attach(&mut self, agent: Arc<crate::metrics::Metrics>) {
        self.agent = Some(agent);
    }

    /// A routed flow was admitted (its SYN, seen at the next poll).
    pub fn opened(&self) {
        if let Some(agent) = &self.agent {
            agent.accepted();
        }
    }

    /// A routed flow ended for `reason`; `expired_at` is its grant's expiry
    /// when that ended it (the teardown's lateness is measured from it).
    pub fn closed(&self, reason: &str, expired_at: Option<SystemTime>) {
        if let Some(agent) = &self.agent {
            let none = proxy_common::session::DirectionCounters::default();
            agent.session_closed(reason, &none, &none, expired_at);
        }
    }

    /// The live routed flows and every routed byte so far.
    pub fn progress(&self, live: usize, bytes_up: u64, bytes_down: u64) {
        if let Some(agent) = &self.agent {
            agent.routed_progress(live, bytes_up, bytes_down);
        }
    }

    pub fn update(&self, stats: &RoutedStats, flows: usize) {
        crate::metrics::advance(&self.opened, stats.flows_opened);
        crate::metrics::advance(&self.full, stats.flows_full);
        crate::metrics::advance(&self.forged, stats.forged_marks);
        crate::metrics::advance(&self.dropped, stats.dropped);
        crate::metrics::advance(&self.preambles, stats.preambles);
        crate::metrics::advance(&self.events_lost, stats.events_lost);
        self.flows.set(i64::try_from(flows).unwrap_or(i64::MAX));
        self.polls.inc();
    }
}
