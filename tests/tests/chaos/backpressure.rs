//! Backpressure: a client streaming to an upstream slower than itself must
//! be held back, on either data path, so that what the bastion holds for a
//! session stays bounded by socket buffers. Found by the zero-window fault
//! (`faults.rs`): on the kernel path, every skb the verdict redirects is
//! queued for the peer socket whether or not the peer can send it, and the
//! client's receive window reopens at once; a zero-window upstream let one
//! client push about 330 MB/s into the bastion's kernel memory (4.7 GiB
//! in 15 s here) until the stall timeout ended the session.
//!
//! The upstream reads 48 MiB at 16 MiB/s, then resets. The audit says how
//! many bytes the agent took from the client; all beyond the 48 MiB the
//! upstream read sat inside the bastion or in the upstream's buffers. With
//! backpressure that is at most a few socket buffers.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use rand::Rng as _;

use super::client::EchoClient;
use super::fixture::{Fixture, Options};
use super::mode::{Case, mib, ms};
use super::wire::{HEADER_LEN, Kind, Spec};

const MIB: u64 = 1024 * 1024;
const READ: u64 = 48 * MIB;
const RATE: u64 = 16 * MIB;
/// Socket buffers between the client and the upstream's reads: the
/// upstream socket's send buffer and the upstream's receive buffer (up to
/// 32 MiB with autotuning here), with room to spare.
const IN_FLIGHT_BOUND: u64 = 64 * MIB;

pub fn run_ebpf(case: &mut Case) -> Result<()> {
    run(case, "ebpf")
}

pub fn run_userspace(case: &mut Case) -> Result<()> {
    run(case, "userspace")
}

fn run(case: &mut Case, datapath: &'static str) -> Result<()> {
    let options = Options {
        datapath,
        ..Options::ebpf()
    }
    .agent("stall_timeout = \"30s\"");
    let fx = Fixture::start(options)?;
    let stream = fx.dial()?;
    let source = stream.local_addr()?.to_string();
    let seed = case.rng.random();
    let client = EchoClient::start_with(
        stream,
        Spec::of(Kind::SlowThenReset, seed, READ, 0, RATE),
        None,
    )?;
    let report = fx.upstream.ledger.wait_for(seed, Duration::from_secs(30))?;
    let sent = client.join()?.sent;
    ensure!(
        report.received.error.is_none() && report.received.bytes == READ,
        "the slow upstream read {} bytes: {:?}",
        report.received.bytes,
        report.received.error
    );
    let events = fx.wait_audit("session_close", 1, Duration::from_secs(30))?;
    let event = events
        .iter()
        .find(|e| e["source"] == source)
        .context("no session_close for the slow session")?;
    let taken = event["bytes_up"].as_u64().context("bytes_up")?;
    let beyond = taken.saturating_sub(READ + HEADER_LEN);
    case.figure(
        datapath,
        format!(
            "client sent {}; the agent took {} from it while the upstream read {} in {}: {} held in the bastion and the upstream's buffers (bound {})",
            mib(sent.bytes),
            mib(taken),
            mib(READ),
            ms(Duration::from_secs_f64(READ as f64 / RATE as f64)),
            mib(beyond),
            mib(IN_FLIGHT_BOUND)
        ),
    );
    ensure!(
        beyond <= IN_FLIGHT_BOUND,
        "no backpressure on the {datapath} path: the agent took {} beyond what a {}/s upstream read",
        mib(beyond),
        mib(RATE)
    );
    fx.wait_idle()
}
