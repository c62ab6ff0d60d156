use super::*;

fn counters(kernel: u64, user: u64) -> DirectionCounters {
    DirectionCounters {
        kernel_bytes: kernel,
        userspace_bytes: user,
        ..DirectionCounters::default()
    }
}

#[test]
fn bytes_sum_closed_and_live_sessions_and_never_go_back() {
    let metrics = Metrics::new(DatapathKind::Ebpf, None);
    metrics.session_closed("client_closed", &counters(100, 0), &counters(7, 0), None);
    let live = Snapshot {
        live_sessions: 1,
        live_grants: 2,
        live_counters: vec![(counters(20, 0), counters(3, 0))],
        token_cache: Some(crate::auth::token_cache::TokenCacheStats {
            hits: 5,
            misses: 2,
            evictions: 1,
            entries: 3,
            capacity: 4096,
        }),
    };
    let text = metrics.render(&live);
    assert!(
        text.contains("tcpgate_bytes_total{direction=\"up\",path=\"kernel\"} 120\n"),
        "{text}"
    );
    assert!(
        text.contains("tcpgate_bytes_total{direction=\"down\",path=\"kernel\"} 10\n"),
        "{text}"
    );
    assert!(text.contains("tcpgate_sessions_live 1\n"), "{text}");
    assert!(text.contains("tcpgate_grants_live 2\n"), "{text}");
    for line in [
        "tcpgate_token_cache_hits_total 5\n",
        "tcpgate_token_cache_misses_total 2\n",
        "tcpgate_token_cache_evictions_total 1\n",
        "tcpgate_token_cache_entries 3\n",
        "tcpgate_token_cache_capacity 4096\n",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert!(
        text.contains("tcpgate_sessions_closed_total{reason=\"client_closed\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("tcpgate_datapath{datapath=\"ebpf\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("tcpgate_datapath{datapath=\"userspace\"} 0\n"),
        "{text}"
    );
    // The live session's entry vanished before its final counters were
    // added: the counter holds instead of dropping.
    let text = metrics.render(&Snapshot::default());
    assert!(
        text.contains("tcpgate_bytes_total{direction=\"up\",path=\"kernel\"} 120\n"),
        "{text}"
    );
}

#[test]
fn denials_and_latencies_are_labelled() {
    let metrics = Metrics::new(DatapathKind::Userspace, None);
    metrics.denied("token_expired");
    metrics.denied("token_expired");
    metrics.denied("session_limit");
    metrics.authenticated(true, Duration::from_millis(3));
    metrics.upstream_connected(false, Duration::from_millis(1));
    let text = metrics.render(&Snapshot::default());
    assert!(
        text.contains("tcpgate_connections_denied_total{reason=\"token_expired\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("tcpgate_connections_denied_total{reason=\"session_limit\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("tcpgate_auth_duration_seconds_count{result=\"admitted\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("tcpgate_upstream_connect_duration_seconds_count{result=\"error\"} 1\n"),
        "{text}"
    );
}
