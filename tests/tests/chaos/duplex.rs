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

use std::time::Duration;

use anyhow::{Result, ensure};
use rand::Rng as _;

use super::fixture::{Fixture, Options};
use super::mode::{Case, mib};
use super::streams::Streams;

pub fn run(case: &mut Case) -> Result<()> {
    let seconds = case.scale.pick(10, 60);
    for datapath in ["ebpf", "userspace"] {
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
        if datapath == "ebpf" {
            let metrics = fx.metrics()?;
            let trimmed = metrics.count("tcpgate_ebpf_retransmit_overlap_bytes_total", &[]);
            let untrimmed = metrics.count("tcpgate_ebpf_retransmit_overlap_untrimmed_total", &[]);
            case.figure(
                "retransmissions",
                format!(
                    "{trimmed} old bytes trimmed from retransmitted skbs by the verdict, {untrimmed} skbs untrimmed"
                ),
            );
            ensure!(
                untrimmed == 0.0,
                "{untrimmed} retransmitted skbs went through untrimmed"
            );
        }
        fx.wait_idle()?;
    }
    Ok(())
}
