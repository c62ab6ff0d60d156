//! Retransmitted bytes the verdict must not move twice.
//!
//! TCP queues a segment that starts before `rcv_nxt` but ends after it (a
//! retransmission, merged by GRO with new data, of bytes whose ACK was
//! lost) whole, with its old head: ordinary readers skip the head by
//! `copied_seq`, but `tcp_read_skb`, which feeds this program, hands over
//! entire skbs. Redirected as they are, the old bytes reach the peer a
//! second time. So each direction remembers the sequence number of its next
//! byte, and an skb that starts before it loses its head here.

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::SkBuffContext};
use aya_log_ebpf::warn;

use crate::maps::{STREAM_SEQ, add, bump};

/// Offset of `cb` (where TCP keeps `tcp_skb_cb`, `seq` first) in the
/// kernel's `struct sk_buff`, read from the running kernel's BTF by the
/// agent before loading. 0: unknown, and the check is off.
#[unsafe(no_mangle)]
static SKB_CB_OFFSET: u32 = 0;

/// `bpf_skb_adjust_room` removes at most this many bytes per call.
const ROOM_STEP: u32 = 0xfff;
/// Calls per skb: enough for 512 KiB of old bytes (seen here: 130,320, a
/// retransmission coalesced into a larger skb).
const TRIM_STEPS: u32 = 128;
const MAX_TRIM: u32 = ROOM_STEP * TRIM_STEPS;

/// Checks the skb against the direction's next sequence number and trims
/// its old head; true when it holds nothing new and must be dropped.
/// `index`: the direction's `SocketEntry::mode_index`.
#[inline(always)]
pub fn only_old_bytes(ctx: &SkBuffContext, index: u32) -> bool {
    // SAFETY: a read of a constant the loader may have patched.
    let offset = unsafe { core::ptr::read_volatile(&SKB_CB_OFFSET) };
    if offset == 0 {
        return false;
    }
    let Some(state) = STREAM_SEQ.get_ptr_mut(index) else {
        return false;
    };
    // SAFETY: the context is the kernel's sk_buff; `offset` is where its
    // `cb` starts, and TCP's control block begins with the start sequence
    // number. The helper copes with any address.
    let seq = unsafe {
        bpf_probe_read_kernel(ctx.skb.skb.cast::<u8>().add(offset as usize).cast::<u32>())
    };
    let Ok(seq) = seq else {
        return false;
    };
    let len = ctx.len();
    // SAFETY: an array element for this direction, written only from its
    // source socket's receive path, one skb at a time.
    let known = unsafe { *state };
    let next = known as u32;
    let behind = next.wrapping_sub(seq) as i32;
    if known >> 32 != 0 && behind > 0 && behind as u32 >= len {
        // Nothing new in it; the next byte stays where it was.
        bump(|s| &mut s.overlap_skbs);
        add(|s| &mut s.overlap_bytes, u64::from(len));
        warn!(
            ctx,
            "tcpgate: skb seq {} len {} holds only bytes before {}: dropped", seq, len, next
        );
        return true;
    }
    // SAFETY: as above.
    unsafe { *state = (1 << 32) | u64::from(seq.wrapping_add(len)) };
    if known >> 32 != 0 && behind > 0 {
        trim_head(ctx, seq, len, behind as u32);
    }
    false
}

/// Removes the first `behind` bytes (all old) of an skb.
#[inline(always)]
fn trim_head(ctx: &SkBuffContext, seq: u32, len: u32, behind: u32) {
    bump(|s| &mut s.overlap_skbs);
    if behind > MAX_TRIM {
        // More than this program trims. Left as it is, and counted.
        bump(|s| &mut s.overlap_untrimmed);
        warn!(
            ctx,
            "tcpgate: skb seq {} len {} starts {} bytes before the next byte: not trimmed",
            seq,
            len,
            behind
        );
        return;
    }
    let mut left = behind;
    for _ in 0..TRIM_STEPS {
        if left == 0 {
            break;
        }
        let step = if left > ROOM_STEP { ROOM_STEP } else { left };
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        left -= step;
    }
    if left != 0 {
        // The kernel could not pull the head (out of memory): what is left
        // of the old bytes goes through, and is counted.
        bump(|s| &mut s.overlap_untrimmed);
    }
    add(|s| &mut s.overlap_bytes, u64::from(behind - left));
}
