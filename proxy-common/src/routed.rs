//! Routed grants: SYNs from a source holding one live source grant are
//! forwarded as plain routing does, and tracked per flow in the pinned
//! `FLOWS` map (see `docs/routed.md`). IPv4 only: other packets take the
//! intercepting path.

/// Destinations one routed source may reach; a grant with more (prefix,
/// port range) pairs is not routed and takes the intercepting path.
pub const MAX_ROUTED_DESTINATIONS: usize = 8;

/// `FlowValue::state`: forwarded and counted.
pub const FLOW_OPEN: u32 = 1;
/// `FlowValue::state`: ended by the agent (expiry, revocation, shutdown);
/// the programs drop everything of the flow but RSTs.
pub const FLOW_ENDED: u32 = 2;
/// `FlowValue::state`: the program found the deadline passed and ended
/// the flow itself (the agent may be gone); dropped like `FLOW_ENDED`.
pub const FLOW_EXPIRED: u32 = 3;

/// `FlowValue::state`: the runner's first bytes were a token preamble's
/// magic; the program dropped them, and the agent resets the flow. A
/// routed flow is never read by the agent, so the token would reach the
/// target otherwise.
pub const FLOW_TOKEN: u32 = 4;

/// `FlowValue::screen_up` once the runner's first bytes are known not to
/// be a preamble: the flow's bytes pass unread from then on.
pub const SCREEN_CLEAR: u32 = u32::MAX;

/// `FlowValue::flags`: a FIN went from the runner to the target.
pub const FLOW_FIN_UP: u32 = 1;
/// `FlowValue::flags`: a FIN went from the target to the runner.
pub const FLOW_FIN_DOWN: u32 = 2;
/// `FlowValue::flags`: either end sent an RST.
pub const FLOW_RST: u32 = 4;
/// `FlowValue::flags`: the target answered (its sequence numbers are known).
pub const FLOW_SEEN_DOWN: u32 = 8;

/// Value of the single-slot `ROUTED_CONFIG` array, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutedConfig {
    /// The mark routed packets carry (`intercept.routed_grants.mark`); 0
    /// turns the programs into a pass-through that clears nothing.
    pub mark: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<RoutedConfig>() == 8);

/// One (prefix, port range) a routed source may reach. IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutedDestination {
    /// Network order octets, masked to `prefix_len`.
    pub addr: [u8; 4],
    pub prefix_len: u32,
    pub port_first: u16,
    pub port_last: u16,
}

const _: () = assert!(size_of::<RoutedDestination>() == 12);

impl RoutedDestination {
    /// Whether `addr:port` is inside.
    #[inline(always)]
    #[must_use]
    pub fn covers(&self, addr: [u8; 4], port: u16) -> bool {
        if port < self.port_first || port > self.port_last || self.prefix_len > 32 {
            return false;
        }
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix_len)
        };
        u32::from_be_bytes(addr) & mask == u32::from_be_bytes(self.addr) & mask
    }
}

/// Value of `ROUTED_SOURCES`, keyed by the source's IPv4 octets: present
/// only while the source holds exactly one live source grant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutedSource {
    pub grant_id: u64,
    /// The grant's expiry on `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`), so the
    /// kernel enforces it without the agent and without wall-clock steps.
    pub deadline_mono_ns: u64,
    /// Entries of `destinations` in use.
    pub count: u32,
    pub _pad: u32,
    pub destinations: [RoutedDestination; MAX_ROUTED_DESTINATIONS],
}

const _: () = assert!(size_of::<RoutedSource>() == 24 + 12 * MAX_ROUTED_DESTINATIONS);

/// Key of `FLOWS`: the 5-tuple as the runner sends it (TCP implied).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub runner_addr: [u8; 4],
    pub target_addr: [u8; 4],
    /// Host order.
    pub runner_port: u16,
    /// Host order.
    pub target_port: u16,
}

const _: () = assert!(size_of::<FlowKey>() == 12);

/// Value of `FLOWS`. The programs update it in place; the agent marks it
/// ended and deletes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub grant_id: u64,
    pub deadline_mono_ns: u64,
    /// When the SYN was seen, `CLOCK_MONOTONIC`.
    pub opened_mono_ns: u64,
    /// Last packet either way, `CLOCK_MONOTONIC`.
    pub last_mono_ns: u64,
    /// Payload bytes runner -> target, counted once each (retransmissions
    /// do not count again: only sequence space beyond `next_seq_up` does).
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Packets, retransmissions included.
    pub packets_up: u64,
    pub packets_down: u64,
    /// The runner's next sequence number (after its highest byte or FIN).
    pub next_seq_up: u32,
    /// The target's next sequence number (valid with `FLOW_SEEN_DOWN`).
    pub next_seq_down: u32,
    /// `FLOW_OPEN`, `FLOW_ENDED`, `FLOW_EXPIRED` or `FLOW_TOKEN`.
    pub state: u32,
    /// `FLOW_FIN_UP` | `FLOW_FIN_DOWN` | `FLOW_RST` | `FLOW_SEEN_DOWN`.
    pub flags: u32,
    /// Packets dropped because the flow had ended.
    pub dropped: u64,
    /// The runner's first sequence number (its SYN's plus one).
    pub first_seq_up: u32,
    /// How many of the runner's first bytes matched
    /// [`crate::PREAMBLE_MAGIC`] so far, or [`SCREEN_CLEAR`].
    pub screen_up: u32,
}

const _: () = assert!(size_of::<FlowValue>() == 8 * 8 + 16 + 8 + 8);

impl FlowValue {
    /// The entry is being removed ([`FLOW_REMOVED`]): every reader takes
    /// it as gone.
    #[must_use]
    pub fn is_removed(&self) -> bool {
        self.opened_mono_ns == FLOW_REMOVED
    }
}

/// Value of the single-slot per-CPU `ROUTED_STATS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutedStats {
    /// SYNs recorded as routed flows.
    pub flows_opened: u64,
    /// Granted SYNs left to the intercepting path because `FLOWS` was full.
    pub flows_full: u64,
    /// Packets carrying the routed mark from elsewhere: the mark was cleared.
    pub forged_marks: u64,
    /// Packets of ended flows dropped.
    pub dropped: u64,
    /// Flows refused because the runner sent a token preamble on them.
    pub preambles: u64,
    /// Flow events `FLOW_EVENTS` had no room for: the agent then reads
    /// `FLOWS` whole.
    pub events_lost: u64,
}

const _: () = assert!(size_of::<RoutedStats>() == 48);

/// `FlowEvent::kind`: the program started the flow at its SYN (or a new
/// SYN took a finished flow's 4-tuple).
pub const FLOW_EVENT_OPENED: u32 = 1;
/// `FlowEvent::kind`: the flow's `state` or `flags` changed (the target
/// answered, a FIN or RST passed, the deadline passed, a token preamble).
pub const FLOW_EVENT_CHANGED: u32 = 2;

/// One record of the `FLOW_EVENTS` ring: what the agent needs to learn of
/// a flow without reading `FLOWS` whole, with its entry as it was then.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: FlowKey,
    /// `FLOW_EVENT_OPENED` or `FLOW_EVENT_CHANGED`.
    pub kind: u32,
    pub flow: FlowValue,
}

const _: () = assert!(size_of::<FlowEvent>() == 16 + size_of::<FlowValue>());

/// `FlowValue::opened_mono_ns` of an entry being removed: set by the
/// sweep or by a SYN taking over the 4-tuple (whichever comes first, with
/// a compare-and-set), so the other leaves it alone. Readers skip it.
pub const FLOW_REMOVED: u64 = u64::MAX;

/// A flow the agent asks `tcpgate_routed_sweep` to remove from `FLOWS`
/// (or `tcpgate_routed_end` to end): changed only while its entry is
/// still the flow that SYN opened. A new SYN on the 4-tuple may have
/// replaced it since the agent looked, and a delete by key alone would
/// take the new flow's entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepEntry {
    pub key: FlowKey,
    /// `SWEEP_IF_UNANSWERED` or 0 (read by the sweep only).
    pub condition: u32,
    /// The flow's `FlowValue::opened_mono_ns`.
    pub opened_mono_ns: u64,
}

/// [`SweepEntry::condition`]: remove the flow only while its target has
/// not answered (no `FLOW_SEEN_DOWN`). The agent takes a flow whose SYN
/// went unanswered for `linger` as finished, but the target may answer a
/// retransmitted SYN until the sweep runs.
pub const SWEEP_IF_UNANSWERED: u32 = 1;

const _: () = assert!(size_of::<SweepEntry>() == 24);

/// Bytes before the first [`SweepEntry`] in the sweep's input: the test
/// run of a tc program takes an Ethernet frame, and these are its header.
pub const SWEEP_HEADER: usize = 14;
/// Entries per run of the sweep: the bound of its loop, and what fits the
/// kernel's limit on a test run's frame (a page less the skb's head and
/// tail room, 3,712 bytes with 4 KiB pages).
pub const SWEEP_BATCH: usize = 128;

const _: () = assert!(SWEEP_HEADER + SWEEP_BATCH * size_of::<SweepEntry>() <= 3712);

/// The frame of one run of `tcpgate_routed_end`: the header, the flow to
/// end (a [`SweepEntry`]), then room where the program writes the flow's
/// [`FlowValue`] as it ended.
pub const END_FRAME: usize = SWEEP_HEADER + size_of::<SweepEntry>() + size_of::<FlowValue>();

impl SweepEntry {
    #[must_use]
    pub fn new(key: FlowKey, opened_mono_ns: u64) -> Self {
        Self {
            key,
            condition: 0,
            opened_mono_ns,
        }
    }

    /// The entry of a flow to remove only while its target has not
    /// answered ([`SWEEP_IF_UNANSWERED`]).
    #[must_use]
    pub fn if_unanswered(self) -> Self {
        Self {
            condition: SWEEP_IF_UNANSWERED,
            ..self
        }
    }

    /// Whether the flow goes only while its target has not answered.
    #[must_use]
    pub const fn only_if_unanswered(&self) -> bool {
        self.condition & SWEEP_IF_UNANSWERED != 0
    }

    /// The entry as the program reads it (native byte order, the layout
    /// of this `repr(C)` struct), without `unsafe`.
    #[must_use]
    pub fn to_ne_bytes(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[0..4].copy_from_slice(&self.key.runner_addr);
        out[4..8].copy_from_slice(&self.key.target_addr);
        out[8..10].copy_from_slice(&self.key.runner_port.to_ne_bytes());
        out[10..12].copy_from_slice(&self.key.target_port.to_ne_bytes());
        out[12..16].copy_from_slice(&self.condition.to_ne_bytes());
        out[16..24].copy_from_slice(&self.opened_mono_ns.to_ne_bytes());
        out
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        FlowEvent, FlowKey, FlowValue, RoutedConfig, RoutedSource, RoutedStats, SweepEntry,
    };
    // SAFETY: each is repr(C), integers and arrays only, and its padding is
    // spelled out as fields (sizes checked above).
    unsafe impl aya::Pod for RoutedConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RoutedSource {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RoutedStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SweepEntry {}
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::{FlowKey, SWEEP_IF_UNANSWERED, SweepEntry};

    #[test]
    fn a_sweep_entry_is_encoded_in_its_struct_layout() {
        let key = FlowKey {
            runner_addr: [192, 0, 2, 1],
            target_addr: [198, 51, 100, 7],
            runner_port: 40_123,
            target_port: 5432,
        };
        let bytes = SweepEntry::new(key, 0x0102_0304_0506_0708).to_ne_bytes();
        let at = |offset: usize, len: usize| &bytes[offset..offset + len];
        assert_eq!(at(offset_of!(FlowKey, runner_addr), 4), [192, 0, 2, 1]);
        assert_eq!(at(offset_of!(FlowKey, target_addr), 4), [198, 51, 100, 7]);
        assert_eq!(
            at(offset_of!(FlowKey, runner_port), 2),
            40_123u16.to_ne_bytes()
        );
        assert_eq!(
            at(offset_of!(FlowKey, target_port), 2),
            5432u16.to_ne_bytes()
        );
        assert_eq!(at(offset_of!(SweepEntry, condition), 4), [0; 4]);
        assert_eq!(
            at(offset_of!(SweepEntry, opened_mono_ns), 8),
            0x0102_0304_0506_0708u64.to_ne_bytes()
        );
        assert!(!SweepEntry::new(key, 1).only_if_unanswered());
        let entry = SweepEntry::new(key, 1).if_unanswered();
        assert!(entry.only_if_unanswered());
        let bytes = entry.to_ne_bytes();
        assert_eq!(
            bytes[offset_of!(SweepEntry, condition)..][..4],
            SWEEP_IF_UNANSWERED.to_ne_bytes()
        );
    }
}
