//! The chaos suite (issue 8): hostile input and faults while legitimate
//! sessions stream data verified by SHA-256.
//!
//! Runs in a bounded form by default (CI: every case, smaller counts and
//! sizes) and in full with `TCPGATE_CHAOS=1` (`cargo xtask test --chaos`).
//! Every random choice comes from one printed seed; `TCPGATE_CHAOS_SEED`
//! replays it. Figures (throughput ratio, JWKS hits, times to close, RSS)
//! are printed on every run.
//!
//! The cases run one at a time, on purpose: each measures the agent under
//! its own load, and a neighbour's load would distort the figures.

mod chaos {
    pub mod backpressure;
    pub mod bad_tokens;
    pub mod client;
    pub mod duplex;
    pub mod faults;
    pub mod fixture;
    pub mod flood;
    pub mod half_close;
    pub mod junk;
    pub mod mode;
    pub mod session_limit;
    pub mod sigkill;
    pub mod soak;
    pub mod streams;
    pub mod upstream;
    pub mod wire;
}

use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::Result;
use chaos::mode::Case;
use tcpgate_tests::require_root;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one case alone, or skips it without root (see `require_root`).
fn run_case(name: &'static str, body: fn(&mut Case) -> Result<()>) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _alone: MutexGuard<'_, ()> = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut case = Case::new(name)?;
    body(&mut case)
}

#[test]
fn junk_flood_is_refused_and_legitimate_sessions_keep_streaming() -> Result<()> {
    run_case("junk", chaos::junk::run)
}

#[test]
fn invalid_token_burst_is_denied_without_hammering_the_jwks() -> Result<()> {
    run_case("bad-tokens", chaos::bad_tokens::run)
}

#[test]
fn upstream_faults_end_sessions_promptly_on_the_kernel_path() -> Result<()> {
    run_case("faults", chaos::faults::run_ebpf)
}

#[test]
fn upstream_faults_end_sessions_promptly_on_the_userspace_path() -> Result<()> {
    run_case("faults", chaos::faults::run_userspace)
}

#[test]
fn slow_upstream_holds_the_client_back_on_the_kernel_path() -> Result<()> {
    run_case("backpressure", chaos::backpressure::run_ebpf)
}

#[test]
fn slow_upstream_holds_the_client_back_on_the_userspace_path() -> Result<()> {
    run_case("backpressure", chaos::backpressure::run_userspace)
}

#[test]
fn full_session_map_refuses_new_connections_and_spares_live_ones() -> Result<()> {
    run_case("session-limit", chaos::session_limit::run)
}

#[test]
fn sigkilled_agent_closes_every_client_and_restarts_clean() -> Result<()> {
    run_case("sigkill", chaos::sigkill::run)
}

#[test]
fn soak_moves_every_byte_and_memory_returns_to_baseline() -> Result<()> {
    run_case("soak", chaos::soak::run)
}

#[test]
fn half_close_with_data_queued_toward_the_closer_loses_nothing() -> Result<()> {
    run_case("half-close", chaos::half_close::run_queued)
}

#[test]
fn immediate_half_closes_racing_the_splice_fall_back_to_the_copy() -> Result<()> {
    run_case("half-close", chaos::half_close::run_immediate)
}

#[test]
fn full_speed_bidirectional_streams_stay_byte_exact() -> Result<()> {
    run_case("duplex", chaos::duplex::run)
}
