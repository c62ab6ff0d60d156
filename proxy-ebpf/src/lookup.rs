//! `sk_lookup`: steers SYNs for intercepted prefixes and ports to the agent's
//! transparent listener. Everything else takes the normal socket lookup.
//!
//! An intercepted destination whose listener slot is empty is refused
//! (`SK_DROP`), never handed to the normal lookup: the link is pinned and
//! outlives a crashed agent, whose listeners leave the SOCKMAP as they close,
//! and a service bound to a wildcard address on the bastion must not answer
//! for the target's address then.
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    btf_maps::lpm_trie::Key,
    macros::sk_lookup,
    programs::SkLookupContext,
};
use proxy_common::{
    addr::{V4_MAPPED_PREFIX_BITS, v4_mapped},
    intercept::{LISTENER_V4, LISTENER_V6},
};

use crate::maps::{INTERCEPT, LISTENERS, bump};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

/// What the lookup decided for one SYN.
enum Verdict {
    /// Not intercepted: the kernel's own lookup runs.
    NotOurs,
    /// Steered to the agent's listener.
    Steered,
    /// Intercepted, but no listener: refuse (the agent is down).
    NoListener,
}

#[sk_lookup]
pub fn tcpgate_lookup(ctx: SkLookupContext) -> u32 {
    match try_lookup(&ctx) {
        Verdict::NotOurs | Verdict::Steered => SK_PASS,
        Verdict::NoListener => SK_DROP,
    }
}

/// The context fields the program uses, each read once with a volatile
/// load: the verifier only accepts ctx accesses at a constant offset from
/// the ctx pointer itself, and plain reads let LLVM hoist `ctx + off` into a
/// register it dereferences later, which the verifier rejects.
struct Fields {
    protocol: u32,
    family: u32,
    local_ip4: u32,
    local_ip6: [u32; 4],
    local_port: u32,
}

fn read_fields(ctx: &SkLookupContext) -> Fields {
    let lookup = ctx.lookup;
    // SAFETY: `lookup` is the program's ctx pointer, valid for the whole run;
    // each read is a single aligned u32 load at a constant ctx offset.
    unsafe {
        Fields {
            protocol: core::ptr::read_volatile(&raw const (*lookup).protocol),
            family: core::ptr::read_volatile(&raw const (*lookup).family),
            local_ip4: core::ptr::read_volatile(&raw const (*lookup).local_ip4),
            local_ip6: [
                core::ptr::read_volatile(&raw const (*lookup).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*lookup).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*lookup).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*lookup).local_ip6[3]),
            ],
            local_port: core::ptr::read_volatile(&raw const (*lookup).local_port),
        }
    }
}

fn try_lookup(ctx: &SkLookupContext) -> Verdict {
    let fields = read_fields(ctx);
    if fields.protocol != IPPROTO_TCP {
        return Verdict::NotOurs;
    }
    let (addr, bits, slot) = match fields.family {
        AF_INET => {
            // local_ip4 is in network order, as the packet carries it.
            let octets = fields.local_ip4.to_ne_bytes();
            (v4_mapped(octets), V4_MAPPED_PREFIX_BITS + 32, LISTENER_V4)
        }
        AF_INET6 => {
            let mut addr = [0u8; 16];
            for (i, word) in fields.local_ip6.iter().enumerate() {
                addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            (addr, 128, LISTENER_V6)
        }
        _ => return Verdict::NotOurs,
    };
    // local_port is in host order.
    let port = fields.local_port as u16;
    let key = Key::new(bits, addr);
    let Some(value) = INTERCEPT.get(&key) else {
        return Verdict::NotOurs;
    };
    if !value.contains(port) {
        return Verdict::NotOurs;
    }
    match LISTENERS.redirect_sk_lookup(ctx, slot, 0) {
        Ok(()) => {
            bump(|s| &mut s.lookups_steered);
            Verdict::Steered
        }
        Err(_) => {
            bump(|s| &mut s.lookups_no_listener);
            Verdict::NoListener
        }
    }
}
