//! `sk_skb/stream_verdict`: moves every payload skb to the peer socket's
//! egress, and counts what it moved in the session record.
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::stream_verdict,
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;
use proxy_common::session::{
    DIRECTION_UP, DirectionCounters, DirectionMode, MODE_REDIRECT, MODE_RESUME, SessionRecord,
    SocketEntry, WakeEvent,
};

use crate::maps::{DIRECTION_MODES, SESSIONS, SOCKETS, SOCKHASH, WAKEUPS, bump};
use crate::overlap::only_old_bytes;

#[stream_verdict]
pub fn tcpgate_verdict(ctx: SkBuffContext) -> u32 {
    // Every skb with payload is redirected or passed: one this program
    // cannot place stays on its own socket, where the agent sees it, rather
    // than being dropped. Only the empty FIN skb is dropped.
    try_verdict(&ctx).unwrap_or(SK_PASS)
}

enum Skip {
    UnknownSocket,
}

fn try_verdict(ctx: &SkBuffContext) -> Result<u32, Skip> {
    if ctx.len() == 0 {
        // A FIN, which carries no byte: drop the empty skb. The agent sees
        // the EOF anyway (the FIN sets RCV_SHUTDOWN: EPOLLRDHUP).
        // Redirecting it makes the peer's backlog send return 0, which the
        // kernel reports as EPIPE on the peer. Passing it is no better: when
        // bytes redirected to this socket still wait in its psock queue,
        // the passed skb is queued behind them, and the backlog worker takes
        // its zero-length delivery for a broken pipe too (EPIPE on this
        // socket, transmission stopped, the queued bytes lost).
        bump(|s| &mut s.fin_passed);
        return Ok(SK_DROP);
    }
    // SAFETY: the helper only reads the skb's socket, which the kernel holds.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(entry) = SOCKETS.get_ptr(&cookie) else {
        bump(|s| &mut s.unknown_socket_skbs);
        return Err(Skip::UnknownSocket);
    };
    // SAFETY: the pointer comes from a successful lookup; user space never
    // rewrites an entry (see `SocketEntry`), and removes it only after the
    // socket left the SOCKHASH.
    let entry: SocketEntry = unsafe { *entry };
    // Before anything counts or moves it: drop what TCP delivers twice.
    if only_old_bytes(ctx, entry.mode_index) {
        return Ok(SK_DROP);
    }
    let len = ctx.len();
    let mode = DIRECTION_MODES.get_ptr_mut(entry.mode_index);
    if let Some(mode) = mode
        // SAFETY: an array element: its memory belongs to this index for
        // the map's lifetime. A racing user-space write can only be the
        // start of backpressure (`MODE_PASS`).
        && unsafe { (*mode).mode } != MODE_REDIRECT
        && !resume(mode, &entry)
    {
        // Backpressure: the peer fell too far behind. The bytes stay on this
        // socket, charged to its receive buffer, and the agent copies them.
        if let Some(record) = SESSIONS.get_ptr_mut(&entry.session_id) {
            // SAFETY: written only from this socket's receive path, one skb
            // at a time (see the counters below).
            direction_counters(unsafe { &mut *record }, entry.direction).passed_bytes +=
                u64::from(len);
        }
        return Ok(SK_PASS);
    }
    let mut peer = entry.peer_cookie;
    let ret = SOCKHASH.redirect_skb(ctx, &mut peer, 0);
    let redirected = ret == i64::from(SK_PASS);
    // Only the first failure of a direction is logged: a peer that left the
    // map fails every later skb too, and logging must stay off the
    // per-packet path. The counters carry the full count.
    let mut first_failure = false;
    let mut kernel_bytes = 0;
    if let Some(record) = SESSIONS.get_ptr_mut(&entry.session_id) {
        // SAFETY: each direction's counters are written only from this
        // socket's receive path, which the kernel runs one skb at a time.
        let counters = direction_counters(unsafe { &mut *record }, entry.direction);
        if redirected {
            counters.kernel_bytes += u64::from(len);
            counters.kernel_packets += 1;
            kernel_bytes = counters.kernel_bytes;
        } else {
            first_failure = counters.redirect_failures == 0;
            counters.redirect_failures += 1;
        }
    }
    if redirected {
        bump(|s| &mut s.redirected_skbs);
        if let Some(mode) = mode {
            wake_agent(mode, &entry, kernel_bytes);
        }
    } else {
        bump(|s| &mut s.redirect_failures);
        if first_failure {
            warn!(
                ctx,
                "tcpgate: redirect failed for session {} (direction {}); later failures are only counted",
                entry.session_id,
                entry.direction
            );
        }
    }
    Ok(SK_PASS)
}

/// With `MODE_RESUME`, switches the direction back to redirecting once the
/// agent has copied every passed byte (`passed_bytes == resume_at`).
/// Deciding here, between two skbs of this socket, is what keeps the byte
/// order.
#[inline(always)]
fn resume(mode: *mut DirectionMode, entry: &SocketEntry) -> bool {
    // SAFETY: an array element (see the caller); the agent writes it whole,
    // and not while an offer to resume is pending.
    let current = unsafe { *mode };
    if current.mode != MODE_RESUME {
        return false;
    }
    let Some(record) = SESSIONS.get_ptr_mut(&entry.session_id) else {
        return false;
    };
    // SAFETY: this direction's counters, which only this socket's receive
    // path writes.
    let counters = direction_counters(unsafe { &mut *record }, entry.direction);
    if counters.passed_bytes != current.resume_at {
        return false;
    }
    counters.handbacks += 1;
    // SAFETY: as above; the agent reads the mode back to learn that the
    // kernel took over.
    unsafe { (*mode).mode = MODE_REDIRECT };
    true
}

/// The counters of one direction of a session record.
#[inline(always)]
fn direction_counters(record: &mut SessionRecord, direction: u32) -> &mut DirectionCounters {
    if direction == DIRECTION_UP {
        &mut record.up
    } else {
        &mut record.down
    }
}

/// Posts one wake-up when the direction's redirected bytes reach the
/// threshold the agent armed, so the agent looks at a direction that
/// started moving fast (and may need backpressure) without polling.
#[inline(always)]
fn wake_agent(mode: *mut DirectionMode, entry: &SocketEntry, kernel_bytes: u64) {
    // SAFETY: an array element (see `try_verdict`); only this socket's
    // receive path writes `wake_at` besides the agent, which rearms it
    // after handling the wake-up.
    unsafe {
        if kernel_bytes < (*mode).wake_at {
            return;
        }
        (*mode).wake_at = u64::MAX;
    }
    let event = WakeEvent {
        session_id: entry.session_id,
        direction: entry.direction,
        _pad: 0,
    };
    // A full ring (the agent is far behind) loses the wake-up; the agent's
    // own timer still looks within a second.
    let _ = WAKEUPS.output(&event, 0);
}
