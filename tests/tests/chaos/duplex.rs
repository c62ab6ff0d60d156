//! Full-speed echo streams, both directions of each session busy at once,
//! for a while: every byte must come back in order, once.
//!
//! Found while the other cases' background streams ran at full speed: on
//! the kernel path, now and then a whole 65,160-byte block (one GSO skb of
//! 45 segments) arrives twice, about once per 10 to 15 GB of echoed
//! traffic on this machine. Transfers in one direction (18 GB tried) and
//! the user-space path never showed it. The failure names the first byte
//! that differs and how far back the repeated bytes come from.
//!
//! Still open: it is not caused by backpressure (seen with
//! `splice_queue_limit` at 1 GiB, when no direction ever left the kernel),
//! nor by map updates racing the verdict (`SocketEntry` is now immutable).
//! The bounded run (CI) therefore checks the user-space path only; the
//! kernel path runs with `TCPGATE_CHAOS=1`, and fails there until the cause
//! is found.

use std::time::Duration;

use anyhow::Result;
use rand::Rng as _;

use super::fixture::{Fixture, Options};
use super::mode::{Case, mib};
use super::streams::Streams;

pub fn run(case: &mut Case) -> Result<()> {
    let seconds = case.scale.pick(10, 60);
    let datapaths: &[&'static str] = if case.scale.is_full() {
        &["ebpf", "userspace"]
    } else {
        case.figure(
            "ebpf",
            "skipped in the bounded run: known open duplication bug, run with TCPGATE_CHAOS=1",
        );
        &["userspace"]
    };
    for &datapath in datapaths {
        let options = Options {
            datapath,
            ..Options::ebpf()
        };
        let fx = Fixture::start(options)?;
        let streams = Streams::start(&fx, 2, case.rng.random(), None)?;
        std::thread::sleep(Duration::from_secs(seconds));
        let moved = streams.finish(&fx);
        case.figure(
            datapath,
            match &moved {
                Ok(bytes) => format!("{} each way in {seconds} s, byte-exact", mib(*bytes)),
                Err(e) => format!("failed after {seconds} s: {e:#}"),
            },
        );
        if let Err(e) = moved {
            return Err(e.context(format!("agent log:\n{}", fx.agent.logs_tail(30))));
        }
        fx.wait_idle()?;
    }
    Ok(())
}
