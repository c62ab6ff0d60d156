//! Full-speed echo streams, both directions of each session busy at once,
//! for a while: every byte must come back in order, once.
//!
//! Found while the other cases' background streams ran at full speed: on
//! the kernel path a block (65,160 bytes, twice that, or part of one)
//! arrived twice in about half of the 10-second runs. The cause is in the
//! kernel: under this load segments get lost and retransmitted, and TCP
//! queues a retransmission that starts before `rcv_nxt` but ends after it
//! whole, old head included; ordinary readers skip the head by
//! `copied_seq`, but `tcp_read_skb`, which feeds the verdict, hands over
//! the whole skb. The verdict now trims the old head itself
//! (`proxy-ebpf/src/overlap.rs`); this case prints how many bytes it
//! trimmed and fails if any retransmission went through untrimmed. The
//! failure names the first byte that differs, how far back the repeated
//! bytes come from, and which direction was wrong.
//!
//! A second kernel round has a small `splice_queue_limit`, so directions
//! switch between the verdict and the agent's copy dozens of times (the
//! default limit sees a few): the hand-overs under full load, both ways at
//! once, are what a loaded CI machine once stalled on.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use rand::Rng as _;

use super::fixture::{Fixture, Options};
use super::mode::{Case, mib};
use super::streams::Streams;

/// Sessions per round.
const STREAMS: usize = 2;
/// The queue limit of the hand-over round: the smallest the config takes.
const SMALL_QUEUE_LIMIT: &str = "splice_queue_limit = 65536";

pub fn run(case: &mut Case) -> Result<()> {
    let seconds = case.scale.pick(10, 60);
    let rounds = [
        ("ebpf", Options::ebpf()),
        (
            "ebpf, small queue limit",
            Options::ebpf().agent(SMALL_QUEUE_LIMIT),
        ),
        (
            "userspace",
            Options {
                datapath: "userspace",
                ..Options::ebpf()
            },
        ),
    ];
    for (label, options) in rounds {
        let fx = Fixture::start(options)?;
        let streams = Streams::start(&fx, STREAMS, case.rng.random(), None)?;
        std::thread::sleep(Duration::from_secs(seconds));
        let moved = streams.finish(&fx);
        case.figure(
            label,
            match &moved {
                Ok(bytes) => format!("{} each way in {seconds} s, byte-exact", mib(*bytes)),
                Err(e) => format!("failed after {seconds} s: {e:#}"),
            },
        );
        if let Err(e) = moved {
            // The error first: a long report is cut at its end. The records
            // say how far each direction got in the kernel and the agent.
            let records = tcpgate_tests::pinned_entries(&fx.pin_dir, "sessions")
                .map_or_else(|e| format!("{e:#}"), |v| format!("{v:?}"));
            bail!(
                "{e:#}\nsession records: {records}\nagent log:\n{}",
                fx.agent.logs_tail(30)
            );
        }
        if fx.is_ebpf() {
            kernel_figures(case, &fx, label)?;
        }
        fx.wait_idle()?;
    }
    Ok(())
}

/// What the kernel rounds did besides moving the bytes: hand-overs,
/// directions that stopped moving, trimmed retransmissions.
fn kernel_figures(case: &Case, fx: &Fixture, label: &str) -> Result<()> {
    let closes = fx.wait_audit("session_close", STREAMS, Duration::from_secs(30))?;
    let sum = |name: &str| -> u64 { closes.iter().filter_map(|e| e[name].as_u64()).sum() };
    let stuck = fx
        .agent
        .logs()
        .matches("has bytes to move and has moved none")
        .count();
    case.figure(
        label,
        format!(
            "backpressure: {} copied by the agent up, {} down; the kernel took a direction back {} times up, {} down; {stuck} reports of a direction that stopped moving",
            mib(sum("backpressure_bytes_up")),
            mib(sum("backpressure_bytes_down")),
            sum("backpressure_handbacks_up"),
            sum("backpressure_handbacks_down"),
        ),
    );
    let metrics = fx.metrics()?;
    let trimmed = metrics.count("tcpgate_ebpf_retransmit_overlap_bytes_total", &[]);
    let untrimmed = metrics.count("tcpgate_ebpf_retransmit_overlap_untrimmed_total", &[]);
    case.figure(
        label,
        format!(
            "retransmissions: {trimmed} old bytes trimmed from retransmitted skbs by the verdict, {untrimmed} skbs untrimmed"
        ),
    );
    ensure!(
        untrimmed == 0.0,
        "{untrimmed} retransmitted skbs went through untrimmed"
    );
    Ok(())
}
