//! Copy first, splice after: on the kernel path, the agent copies a
//! session's first bytes itself and hands the session to the kernel once
//! they have passed (`agent.splice_after_bytes`), or once it has copied
//! what was queued behind bytes it read (see [`PartlyRead`]). Entering and
//! leaving the SOCKHASH costs more than copying a few bytes: a short
//! session (a health check, one query) that ends within the budget never
//! pays for it.

use tokio::net::TcpStream;

use super::ebpf::EbpfDatapath;
use super::userspace::CopyFirst;
use super::{PartlyRead, SessionMeta, SpliceOutcome, StopSignal, kernel_session};

/// Whether the session goes to the kernel path at once: nothing to copy
/// first.
pub(super) fn at_once(dp: &EbpfDatapath, partly_read: PartlyRead) -> bool {
    dp.timeouts.splice_after == 0 && partly_read == PartlyRead::No
}

/// Moves the session's bytes on the kernel path, after the agent copied
/// the first `agent.splice_after_bytes` of them, and at least what is
/// queued (a budget of 0 copies up to the first complete read of each
/// socket: from there on, every queued skb is whole).
pub(super) async fn run(
    dp: &EbpfDatapath,
    meta: &SessionMeta,
    (client, upstream): (TcpStream, TcpStream),
    stop: StopSignal,
) -> SpliceOutcome {
    let limit = dp.timeouts.splice_after;
    dp.list_copied(meta);
    let first = dp
        .fallback
        .copy_first(meta, client, upstream, &stop, limit)
        .await;
    let (client, upstream, copied) = match first {
        CopyFirst::Ended(outcome) => {
            dp.unlist(meta.id);
            return outcome;
        }
        CopyFirst::Spent {
            client,
            upstream,
            copied,
        } => (client, upstream, copied),
    };
    let mut outcome = kernel_session::run(dp, meta, client, upstream, stop).await;
    // The kernel path removed the record it wrote over ours; one it could
    // not take (a peer half-closed first) was copied under ours.
    dp.unlist(meta.id);
    // The live view counted the copied bytes until here (see
    // `EbpfDatapath::live_counters`); the outcome adds them to the rest.
    dp.fallback.forget_live(meta.id);
    outcome.up.userspace_bytes += copied.0;
    outcome.down.userspace_bytes += copied.1;
    outcome
}
