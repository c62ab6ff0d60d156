//! The agent's eBPF programs' run statistics in `/metrics`
//! (`tcpgate_ebpf_program_runs_total`, `..._run_seconds_total`): counted
//! only while the kernel's statistics are on, and then at least once per
//! packet a routed flow's entry in `FLOWS` counted, each way.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::AuthFixture;
use tcpgate_tests::bpf_stats::RunStatsOn;
use tcpgate_tests::metrics::{Exposition, parse, scrape_unix};
use tcpgate_tests::routed::{exchange_half_closed, routed_launch_lingering};
use tcpgate_tests::{Payload, eventually, pinned_entries, require_root, wait_events};

const PORT: u16 = 9000;
const RUNS: &str = "tcpgate_ebpf_program_runs_total";
const SECONDS: &str = "tcpgate_ebpf_program_run_seconds_total";

fn scrape(fx: &AuthFixture) -> Result<Exposition> {
    Ok(parse(&scrape_unix(&fx.admin_socket())?)?)
}

fn runs(m: &Exposition, program: &str) -> f64 {
    m.count(RUNS, &[("program", program)])
}

/// The `nth` routed exchange (from 1); the packets its `FLOWS` entry
/// counted (up, down), read while the finished flow lingers (its close
/// line comes when it goes).
fn routed_exchange(fx: &AuthFixture, nth: u64) -> Result<(f64, f64)> {
    let (up, down) = (
        Payload::new(nth, nth << 20),
        Payload::new(nth + 10, 256 << 10),
    );
    exchange_half_closed(fx, PORT, up, down)?;
    let opened = wait_events(&fx.agent, "session_open", nth as usize)?;
    ensure!(
        opened.iter().all(|o| o["datapath"] == "routed"),
        "{opened:?}"
    );
    let mut packets = (0.0, 0.0);
    eventually(
        Duration::from_secs(10),
        "the finished flow's counts in FLOWS",
        || -> Result<bool> {
            let entries = pinned_entries(fx.agent.pin_dir(), "flows")?;
            let value = entries
                .iter()
                .map(|e| &e["formatted"]["value"])
                .find(|v| v["bytes_up"] == up.len && v["bytes_down"] == down.len);
            if let Some(v) = value {
                let count = |field: &str| v[field].as_f64().unwrap_or(0.0);
                packets = (count("packets_up"), count("packets_down"));
            }
            Ok(value.is_some())
        },
    )?;
    Ok(packets)
}

#[test]
fn routed_packets_are_counted_while_run_statistics_are_on() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Finished flows stay in FLOWS long enough to read their packet counts.
    let fx = AuthFixture::start_launched(
        &tcpgate_tests::auth_fixture::policy("15m"),
        &[],
        routed_launch_lingering("60s", ""),
    )?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let before = scrape(&fx)?;
    for program in [
        "tcpgate_lookup",
        "tcpgate_routed_in",
        "tcpgate_routed_out",
        "tcpgate_routed_sweep",
    ] {
        ensure!(
            before.value(RUNS, &[("program", program)]).is_some()
                && before.value(SECONDS, &[("program", program)]).is_some(),
            "{program} listed"
        );
    }
    let machine_off = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|v| v.trim() == "0");
    if machine_off {
        routed_exchange(&fx, 1)?;
        let off = scrape(&fx)?;
        ensure!(
            runs(&off, "tcpgate_routed_in") == 0.0 && runs(&off, "tcpgate_routed_out") == 0.0,
            "nothing counted while the statistics are off"
        );
    } else {
        eprintln!("kernel.bpf_stats_enabled is on here: the off half is skipped");
        routed_exchange(&fx, 1)?;
    }
    let stats = RunStatsOn::enable().context("BPF_ENABLE_STATS")?;
    let start = scrape(&fx)?;
    let (up, down) = routed_exchange(&fx, 2)?;
    ensure!(up > 0.0 && down > 0.0, "the flow counted packets");
    eventually(
        Duration::from_secs(10),
        "each direction's packets counted by its program",
        || -> Result<bool> {
            let now = scrape(&fx)?;
            let grew = |p| runs(&now, p) - runs(&start, p);
            let took =
                |p| now.count(SECONDS, &[("program", p)]) - start.count(SECONDS, &[("program", p)]);
            Ok(grew("tcpgate_routed_in") >= up
                && grew("tcpgate_routed_out") >= down
                && took("tcpgate_routed_in") > 0.0
                && took("tcpgate_routed_out") > 0.0)
        },
    )?;
    drop(stats);
    Ok(())
}
