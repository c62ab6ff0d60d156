//! Whether the bastion itself still holds a connection for a SYN's
//! 4-tuple: a TIME_WAIT (or a live socket) left by an earlier connection
//! the intercepting path terminated. The stack's early demultiplexing
//! would hand a routed packet of that 4-tuple to that local socket instead
//! of forwarding it, so such a SYN is not routed: the intercepting path,
//! which owns the socket, takes it (a reused 4-tuple is how a busy runner
//! meets one).
use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};

use crate::packet::Segment;

/// `TCP_LISTEN` in `bpf_sock::state`: a listener (the agent's, found
/// through its sk_lookup steering) is not a connection.
const TCP_LISTEN: u32 = 10;

#[inline(always)]
pub fn holds_connection(ctx: &TcContext, segment: &Segment) -> bool {
    // SAFETY: an all-zero tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: writing the IPv4 member of a union we own.
    unsafe {
        let v4 = &mut tuple.__bindgen_anon_1.ipv4;
        v4.saddr = u32::from_ne_bytes(segment.src);
        v4.daddr = u32::from_ne_bytes(segment.dst);
        v4.sport = segment.sport.to_be();
        v4.dport = segment.dport.to_be();
    }
    let size = core::mem::size_of::<u32>() * 2 + core::mem::size_of::<u16>() * 2;
    // SAFETY: the helper reads `size` bytes of `tuple` (its IPv4 member)
    // and returns a referenced socket or null.
    let sk: *mut bpf_sock = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb.cast(),
            &raw mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null socket from the lookup, readable until released.
    let state = unsafe { (*sk).state };
    // SAFETY: every socket the lookup returns is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    state != TCP_LISTEN
}
