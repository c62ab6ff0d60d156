//! The agent's metric families, registered once at start.

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{BYTE_SERIES, BytesLabels, DatapathLabels, Metrics};
use crate::datapath::DatapathKind;

impl Metrics {
    pub(super) fn register(&mut self, datapath: DatapathKind) {
        let registry = &mut self.registry;
        registry.register(
            "sessions_live",
            "Sessions admitted and not yet ended",
            self.sessions_live.clone(),
        );
        registry.register(
            "grants_live",
            "Grants in the grant store",
            self.grants_live.clone(),
        );
        registry.register(
            "connections_accepted",
            "Connections admitted (authenticated, under the session limit)",
            self.accepted.clone(),
        );
        registry.register(
            "connections_denied",
            "Connections refused, by reason (no_rule_matched, token_expired, bad_magic, timeout, session_limit, not_intercepted, ...)",
            self.denied.clone(),
        );
        registry.register(
            "sessions_closed",
            "Sessions ended, by reason (client_closed, grant_expired, revoked, agent_shutdown, ...)",
            self.closed.clone(),
        );
        registry.register(
            "bytes",
            "Payload bytes moved, by direction (up: client to upstream) and path (kernel: the eBPF verdict's counters; userspace: the copy fallback; routed: the routed tc programs' counters)",
            self.bytes.clone(),
        );
        registry.register(
            "auth_duration_seconds",
            "Time from accept to the admission decision, by result (admitted, denied)",
            self.auth_seconds.clone(),
        );
        registry.register(
            "upstream_connect_duration_seconds",
            "Time to connect upstream, by result (ok, error)",
            self.connect_seconds.clone(),
        );
        registry.register(
            "expiry_teardown_seconds",
            "From a grant's expiry to the teardown of each of its sessions",
            self.expiry_teardown_seconds.clone(),
        );
        registry.register(
            "limit_hits",
            "Times a bound was hit, by its [auth.limits] field (pending_connections, pending_per_source, grants_per_subject, grants_per_source, max_grants, grants_map)",
            self.limit_hits.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit lines dropped because the writer was behind (connection_denied lines only; session lines are never dropped)",
            self.audit_dropped.clone(),
        );
        registry.register(
            "ebpf_redirect_failures",
            "Skbs the verdict program could not redirect (peer socket missing), all CPUs",
            self.ebpf_redirect_failures.clone(),
        );
        registry.register(
            "ebpf_redirected_skbs",
            "Skbs the verdict program redirected to the peer socket, all CPUs",
            self.ebpf_redirected_skbs.clone(),
        );
        registry.register(
            "ebpf_lookups_steered",
            "Intercepted SYNs the sk_lookup program steered to the agent",
            self.ebpf_lookups_steered.clone(),
        );
        registry.register(
            "ebpf_lookups_no_listener",
            "Intercepted SYNs that found no agent listener",
            self.ebpf_lookups_no_listener.clone(),
        );
        registry.register(
            "ebpf_retransmit_overlap_bytes",
            "Retransmitted bytes TCP handed to the verdict a second time, trimmed before they could reach the peer twice",
            self.ebpf_retransmit_overlap_bytes.clone(),
        );
        registry.register(
            "ebpf_retransmit_overlap_untrimmed",
            "Retransmissions whose old bytes the verdict could not trim (they reached the peer twice); should stay 0",
            self.ebpf_retransmit_overlap_untrimmed.clone(),
        );
        let paths: Family<DatapathLabels, Gauge> = Family::default();
        for kind in [DatapathKind::Ebpf, DatapathKind::Userspace] {
            paths
                .get_or_create(&DatapathLabels {
                    datapath: kind.as_str(),
                })
                .set(i64::from(kind == datapath));
        }
        registry.register(
            "datapath",
            "The data path in use (1) and the other (0)",
            paths,
        );
        for (_, direction, path) in BYTE_SERIES {
            // Present at zero from the start, so rates work from the first scrape.
            let _ = self.bytes.get_or_create(&BytesLabels { direction, path });
        }
    }
}
