//! Full-speed echo streams, both directions of each session busy at once,
//! for a while: every byte must come back in order, once.
//!
//! Found while the other cases' background streams ran at full speed: on
//! the kernel path, now and then a whole 65,160-byte block (one GSO skb of
//! 45 segments) arrives twice, about once per 10 to 15 GB of echoed
//! traffic on this machine. Transfers in one direction (18 GB tried) and
//! the user-space path never showed it. The failure names the first byte
//! that differs and how far back the repeated bytes come from.

use std::time::Duration;

use anyhow::Result;
use rand::Rng as _;

use super::fixture::{Fixture, Options};
use super::mode::{Case, mib};
use super::streams::Streams;

pub fn run(case: &mut Case) -> Result<()> {
    let seconds = case.scale.pick(10, 60);
    let fx = Fixture::start(Options::ebpf())?;
    let streams = Streams::start(&fx, 2, case.rng.random(), None)?;
    std::thread::sleep(Duration::from_secs(seconds));
    let moved = streams.finish(&fx);
    case.figure(
        "echoed",
        match &moved {
            Ok(bytes) => format!("{} each way in {seconds} s, byte-exact", mib(*bytes)),
            Err(e) => format!("failed after {seconds} s: {e:#}"),
        },
    );
    moved?;
    fx.wait_idle()
}
