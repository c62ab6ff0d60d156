use super::*;

fn find<'a>(goals: &'a [Goal], name: &str) -> &'a Goal {
    goals.iter().find(|g| g.name == name).expect(name)
}

fn value(goal: &Goal) -> Option<f64> {
    goal.figure.as_ref().map(|f| f.value)
}

#[test]
fn throughput_takes_tcpgates_fastest_path_against_direct() {
    let mut r = Results::default();
    for (c, v) in [
        ("direct", 10.0),
        ("tcpgate-ebpf", 8.0),
        ("tcpgate-userspace", 9.5),
        ("haproxy", 5.0),
    ] {
        r.add(Metric::ThroughputOneStream, c, v);
    }
    for (c, v) in [("direct", 20.0), ("tcpgate-ebpf", 17.0)] {
        r.add(Metric::ThroughputEightStreams, c, v);
    }
    let goals = evaluate(&r);
    let one = find(
        &goals,
        "throughput 1 stream, tcpgate's fastest path vs direct",
    );
    assert_eq!((value(one), one.met()), (Some(0.95), Some(true)));
    assert_eq!(one.shown(), "0.95× (user space 9.50 vs 10.00 Gbit/s)");
    assert_eq!(one.target_text(), "≥ 0.9× direct");
    let eight = find(
        &goals,
        "throughput 8 streams, tcpgate's fastest path vs direct",
    );
    assert_eq!((value(eight), eight.met()), (Some(0.85), Some(false)));
    assert_eq!(eight.verdict(), "MISSED");
}

#[test]
fn cpu_per_gib_takes_the_cheapest_path_against_direct() {
    let mut r = Results::default();
    for (c, v) in [
        ("direct", 0.5),
        ("tcpgate-ebpf", 0.55),
        ("tcpgate-userspace", 0.7),
    ] {
        r.add(Metric::CpuPerGibAttributed, c, v);
    }
    // The whole-machine figure is not a goal any more.
    r.add(Metric::CpuPerGib, "tcpgate-ebpf", 99.0);
    let goals = evaluate(&r);
    let cpu = find(
        &goals,
        "CPU per GiB (bench processes + kernel threads) vs direct",
    );
    assert_eq!(cpu.met(), Some(true));
    assert_eq!(cpu.shown(), "1.10× (eBPF 0.550 vs 0.500 s/GiB)");
    assert_eq!(cpu.target_text(), "≤ 1.2× direct");
    r.add(Metric::CpuPerGibAttributed, "tcpgate-ebpf", 0.65);
    r.add(Metric::CpuPerGibAttributed, "tcpgate-ebpf", 0.65);
    let goals = evaluate(&r);
    let cpu = find(
        &goals,
        "CPU per GiB (bench processes + kernel threads) vs direct",
    );
    assert_eq!(cpu.met(), Some(false));
}

#[test]
fn added_latency_is_over_direct_against_haproxys() {
    let mut r = Results::default();
    for (c, v) in [
        ("direct", 100.0),
        ("tcpgate-ebpf", 120.0),
        ("haproxy", 150.0),
    ] {
        r.add(Metric::LatencyP50, c, v);
    }
    for (c, v) in [
        ("direct", 100.0),
        ("tcpgate-ebpf", 140.0),
        ("haproxy", 150.0),
    ] {
        r.add(Metric::LatencyP99, c, v);
    }
    let goals = evaluate(&r);
    let p50 = find(
        &goals,
        "added request/response latency p50, tcpgate vs haproxy",
    );
    assert_eq!((value(p50), p50.met()), (Some(0.4), Some(true)));
    assert_eq!(p50.shown(), "0.40× (eBPF +20.0 vs +50.0 µs over direct)");
    // A path that measured under direct (noise) shows a negative figure.
    r.add(Metric::LatencyP50, "tcpgate-ebpf", 90.0);
    r.add(Metric::LatencyP50, "tcpgate-ebpf", 90.0);
    let goals = evaluate(&r);
    let p50 = find(
        &goals,
        "added request/response latency p50, tcpgate vs haproxy",
    );
    assert_eq!(p50.shown(), "-0.20× (eBPF -10.0 vs +50.0 µs over direct)");
    let p99 = find(
        &goals,
        "added request/response latency p99, tcpgate vs haproxy",
    );
    assert_eq!((value(p99), p99.met()), (Some(0.8), Some(false)));
}

#[test]
fn connection_rates_are_anchored_on_haproxys_plain_tcp_rate() {
    let mut r = Results::default();
    for (c, v) in [
        ("direct", 20_000.0),
        ("haproxy", 8_000.0),
        ("no-auth", 6_000.0),
        ("preamble", 8_000.0),
        ("grant", 11_000.0),
    ] {
        r.add(Metric::ConnectionsPerSecond, c, v);
    }
    let goals = evaluate(&r);
    let preamble = find(&goals, "new connections/s, preamble, vs HAProxy plain TCP");
    assert_eq!((value(preamble), preamble.met()), (Some(1.0), Some(true)));
    assert_eq!(preamble.target_text(), "≥ 1× HAProxy");
    let grant = find(&goals, "new connections/s, grant, vs HAProxy plain TCP");
    assert_eq!(grant.met(), Some(false), "11,000 < 1.5 × 8,000");
    assert_eq!(grant.shown(), "1.38× (grant 11000 vs 8000/s)");
    assert_eq!(grant.target_text(), "≥ 1.5× HAProxy");
    // The routed grant path counts when it is the faster one.
    r.add(Metric::ConnectionsPerSecond, "grant-routed", 16_000.0);
    let goals = evaluate(&r);
    let grant = find(&goals, "new connections/s, grant, vs HAProxy plain TCP");
    assert_eq!(grant.met(), Some(true), "16,000 ≥ 1.5 × 8,000");
    assert_eq!(grant.shown(), "2.00× (grant-routed 16000 vs 8000/s)");
    // So does copying first (`agent.splice_after_bytes`), named as such.
    r.add(Metric::ConnectionsPerSecond, "preamble-copy-first", 9_200.0);
    let goals = evaluate(&r);
    let preamble = find(&goals, "new connections/s, preamble, vs HAProxy plain TCP");
    assert_eq!(
        preamble.shown(),
        "1.15× (preamble-copy-first 9200 vs 8000/s)"
    );
    // Without the anchor there is no verdict, whatever the rate.
    let mut unanchored = Results::default();
    unanchored.add(Metric::ConnectionsPerSecond, "grant", 50_000.0);
    let goals = evaluate(&unanchored);
    let grant = find(&goals, "new connections/s, grant, vs HAProxy plain TCP");
    assert_eq!((grant.met(), grant.shown()), (None, "not measured"));
}

#[test]
fn memory_and_teardown_are_absolute() {
    let mut r = Results::default();
    r.add(Metric::TeardownP99, "tcpgate-ebpf", 70.0);
    let goals = evaluate(&r);
    let teardown = find(&goals, "teardown after grant expiry p99");
    assert_eq!(
        (teardown.met(), teardown.verdict(), teardown.shown()),
        (Some(false), "MISSED", "70.0 ms")
    );
    assert_eq!(teardown.target_text(), "≤ 50 ms");
    let rss = find(&goals, "agent RSS at 10,000 idle sessions (eBPF)");
    assert_eq!(
        (rss.met(), rss.verdict(), rss.shown()),
        (None, "-", "not measured")
    );
    assert_eq!(rss.target_text(), "≤ 64 MiB");
    assert_eq!(absolute_target(Metric::ConnectionsPerSecond), None);
}

#[test]
fn targets_render_their_limit_once_and_judge_by_it() {
    assert_eq!(Target::AtLeast(1.5).to_string(), "≥ 1.5");
    assert_eq!(Target::AtMost(0.5).to_string(), "≤ 0.5");
    assert_eq!(Target::AtMost(64.0).to_string(), "≤ 64");
    assert_eq!(Target::AtLeast(20_000.0).to_string(), "≥ 20,000");
    assert_eq!(Target::AtLeast(1_250_000.0).to_string(), "≥ 1,250,000");
    assert!(Target::AtLeast(2.0).met_by(2.0) && !Target::AtLeast(2.0).met_by(1.9));
    assert!(Target::AtMost(2.0).met_by(2.0) && !Target::AtMost(2.0).met_by(2.1));
}

#[test]
fn every_goal_of_the_issue_is_reported_even_unmeasured() {
    let goals = evaluate(&Results::default());
    // 2 throughput, CPU, 2 latency, 2 connection rates, RSS, teardown,
    // revocation across bastions, and issue 15's takeover pause.
    assert_eq!(goals.len(), 11);
    assert!(goals.iter().all(|g| g.met().is_none()));
}

#[test]
fn revocation_across_bastions_is_absolute_on_the_fleet_figure() {
    let mut r = Results::default();
    r.add(Metric::RevocationP99, super::super::fleet::FLEET, 180.0);
    let goals = evaluate(&r);
    let revocation = find(
        &goals,
        "revocation on bastion B until A's 100 sessions are reset, p99",
    );
    assert_eq!(
        (
            revocation.met(),
            revocation.shown(),
            revocation.target_text()
        ),
        (Some(true), "180.0 ms", "≤ 250 ms".to_owned())
    );
}

#[test]
fn the_takeover_pause_goal_is_the_p99_over_runs_not_the_median() {
    let mut r = Results::default();
    for pause in [3.0, 4.0, 150.0] {
        r.add(Metric::TakeoverPause, "tcpgate-ebpf", pause);
    }
    let goals = evaluate(&r);
    let takeover = find(
        &goals,
        "longest stream pause during a takeover at 1,000 sessions, p99 (issue 15)",
    );
    assert_eq!(takeover.met(), Some(false), "{}", takeover.shown());
    assert_eq!(takeover.target_text(), "≤ 100 ms");
}

#[test]
fn a_ratio_that_rounds_onto_its_limit_shows_the_digits_that_decide() {
    let mut r = Results::default();
    for (c, v) in [("direct", 59.75), ("tcpgate-routed", 53.55)] {
        r.add(Metric::ThroughputEightStreams, c, v);
    }
    for (c, v) in [("direct", 1.0), ("tcpgate-routed", 1.2004)] {
        r.add(Metric::CpuPerGibAttributed, c, v);
    }
    let goals = evaluate(&r);
    let eight = find(
        &goals,
        "throughput 8 streams, tcpgate's fastest path vs direct",
    );
    assert_eq!(eight.verdict(), "MISSED");
    assert_eq!(eight.shown(), "0.896× (routed 53.55 vs 59.75 Gbit/s)");
    let cpu = find(
        &goals,
        "CPU per GiB (bench processes + kernel threads) vs direct",
    );
    assert_eq!(cpu.verdict(), "MISSED");
    assert_eq!(cpu.shown(), "1.2004× (routed 1.200 vs 1.000 s/GiB)");
    // Two decimals where they already agree with the verdict.
    assert_eq!(ratio_text(0.904, Target::AtLeast(0.9)), "0.90");
    assert_eq!(ratio_text(0.8949, Target::AtLeast(0.9)), "0.89");

    // Absolute goals likewise, from one decimal.
    let mut r = Results::default();
    r.add(Metric::TeardownP99, "tcpgate-ebpf", 50.04);
    let goals = evaluate(&r);
    let teardown = find(&goals, "teardown after grant expiry p99");
    assert_eq!(
        (teardown.verdict(), teardown.shown()),
        ("MISSED", "50.04 ms")
    );
    assert_eq!(decisive(49.96, Target::AtMost(50.0), 1), "50.0");
    assert_eq!(decisive(64.0001, Target::AtMost(64.0), 1), "64.0001");
}
