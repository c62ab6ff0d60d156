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
    let metrics = Metrics::new(DatapathKind::Ebpf, None, None);
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
    let metrics = Metrics::new(DatapathKind::Userspace, None, None);
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

#[test]
fn program_run_statistics_are_per_program_and_never_go_back() {
    use crate::bpf::run_stats::ProgramRuns;
    use crate::sys_bpf::RunCounts;
    let metrics = Metrics::new(DatapathKind::Ebpf, None, None);
    let figure = |program: &str, runs, run_time_ns| ProgramRuns {
        program: program.to_owned(),
        counts: RunCounts { runs, run_time_ns },
    };
    metrics.programs.record(&[
        figure("tcpgate_routed_in", 4, 1_500_000_000),
        figure("tcpgate_lookup", 2, 250_000_000),
    ]);
    // The kernel's counters never go back; neither do ours, whatever a
    // read returns.
    metrics
        .programs
        .record(&[figure("tcpgate_routed_in", 3, 1_000_000_000)]);
    let text = metrics.render(&Snapshot::default());
    for line in [
        "tcpgate_ebpf_program_runs_total{program=\"tcpgate_routed_in\"} 4\n",
        "tcpgate_ebpf_program_runs_total{program=\"tcpgate_lookup\"} 2\n",
        "tcpgate_ebpf_program_run_seconds_total{program=\"tcpgate_routed_in\"} 1.5\n",
        "tcpgate_ebpf_program_run_seconds_total{program=\"tcpgate_lookup\"} 0.25\n",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
}
