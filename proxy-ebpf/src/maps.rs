//! Maps shared by the programs. Sizes are defaults: the agent resizes them
//! at load time from its configuration.
use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, SockHash, SockMap},
    macros::btf_map,
};
use proxy_common::{
    grant::GrantRecord,
    intercept::InterceptValue,
    routed::{FlowEvent, FlowKey, FlowValue, RoutedConfig, RoutedSource, RoutedStats},
    session::{DirectionMode, SessionRecord, SocketEntry, WakeEvent},
    stats::GlobalStats,
};

/// Spliced sockets, keyed by socket cookie.
#[btf_map]
pub static SOCKHASH: SockHash<u64, 32768> = SockHash::new();

/// Socket cookie -> its peer and session.
#[btf_map]
pub static SOCKETS: HashMap<u64, SocketEntry, 32768> = HashMap::new();

/// How the verdict treats each direction (`SocketEntry::mode_index`):
/// an array, so user space updates an element in place and a verdict
/// reading it never sees another entry's bytes.
#[btf_map]
pub static DIRECTION_MODES: Array<DirectionMode, 32768> = Array::new();

/// The TCP sequence number of each direction's next byte, indexed like
/// `DIRECTION_MODES`; bit 32 is set once the first skb was seen. Written by
/// the verdict only (user space zeroes it when a slot is handed out).
#[btf_map]
pub static STREAM_SEQ: Array<u64, 32768> = Array::new();

/// Wake-ups for the agent (see `DirectionMode::wake_at`). 64 KiB: 4,096
/// events; one per direction is outstanding at most.
#[btf_map]
pub static WAKEUPS: RingBuf<WakeEvent, 65536> = RingBuf::new();

/// Session id -> session record with per-direction counters.
#[btf_map]
pub static SESSIONS: HashMap<u64, SessionRecord, 16384> = HashMap::new();

/// Grant id -> grant record. Written by user space only; declared here so
/// it is created with BTF and pinned beside the others.
#[btf_map]
pub static GRANTS: HashMap<u64, GrantRecord, 16384> = HashMap::new();

/// Agent-wide counters.
#[btf_map]
pub static STATS: PerCpuArray<GlobalStats, 1> = PerCpuArray::new();

/// Intercepted prefixes and their ports.
#[btf_map]
pub static INTERCEPT: LpmTrie<[u8; 16], InterceptValue, 4096> = LpmTrie::new();

/// The agent's transparent listeners (slot 0: IPv4, slot 1: IPv6).
#[btf_map]
pub static LISTENERS: SockMap<2> = SockMap::new();

/// Adds one to a field of this CPU's stats slot.
#[inline(always)]
pub fn bump(field: impl FnOnce(&mut GlobalStats) -> &mut u64) {
    add(field, 1);
}

/// Adds `amount` to a field of this CPU's stats slot.
#[inline(always)]
pub fn add(field: impl FnOnce(&mut GlobalStats) -> &mut u64, amount: u64) {
    if let Some(stats) = STATS.get_ptr_mut(0) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and
        // is only used on this CPU while the program runs.
        let stats = unsafe { &mut *stats };
        *field(stats) += amount;
    }
}

/// Routed flows by 5-tuple (see `routed_in`). Sized from
/// `intercept.routed_grants.max_flows` at load time.
#[btf_map]
pub static FLOWS: HashMap<FlowKey, FlowValue, 4096> = HashMap::new();

/// Routed flows' openings and changes, for the agent (see
/// [`emit_flow`]). Sized from `max_flows` at load time.
#[btf_map]
pub static FLOW_EVENTS: RingBuf<FlowEvent, 65536> = RingBuf::new();

/// Sources whose SYNs may be routed: written by the agent only.
#[btf_map]
pub static ROUTED_SOURCES: HashMap<[u8; 4], RoutedSource, 16384> = HashMap::new();

/// The routed mark (slot 0), written by the agent.
#[btf_map]
pub static ROUTED_CONFIG: Array<RoutedConfig, 1> = Array::new();

/// The routed programs' counters.
#[btf_map]
pub static ROUTED_STATS: PerCpuArray<RoutedStats, 1> = PerCpuArray::new();

/// Adds one to a field of this CPU's routed stats slot.
#[inline(always)]
pub fn bump_routed(field: impl FnOnce(&mut RoutedStats) -> &mut u64) {
    if let Some(stats) = ROUTED_STATS.get_ptr_mut(0) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and
        // is only used on this CPU while the program runs.
        let stats = unsafe { &mut *stats };
        *field(stats) += 1;
    }
}

/// Tells the agent of a flow's opening or change, with its entry as it is
/// now. A full ring loses the event and counts it: the agent then reads
/// `FLOWS` whole.
#[inline(always)]
pub fn emit_flow(kind: u32, key: &FlowKey, flow: &FlowValue) {
    let Some(mut entry) = FLOW_EVENTS.reserve(0) else {
        bump_routed(|s| &mut s.events_lost);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at the reserved record, sized and aligned for
    // a `FlowEvent` (the ring aligns to 8); every field is written before
    // the record is submitted.
    unsafe {
        (*event).key = *key;
        (*event).kind = kind;
        (*event).flow = *flow;
    }
    // No wake-up: the agent takes the records in on its own timer.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}
