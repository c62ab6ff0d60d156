//! Agent-wide counters kept by the eBPF programs, one slot per CPU.

/// Value of the single-slot per-CPU `STATS` array. User space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// Skbs redirected to a peer socket.
    pub redirected_skbs: u64,
    /// Skbs whose peer was missing from the SOCKHASH; passed to their own socket.
    pub redirect_failures: u64,
    /// Skbs on a socket the verdict program has no entry for.
    pub unknown_socket_skbs: u64,
    /// Empty skbs (a FIN) the verdict dropped: they carry no byte, and the
    /// agent sees the EOF from the FIN itself (EPOLLRDHUP).
    pub fin_passed: u64,
    /// SYNs the lookup program steered to the agent's listener.
    pub lookups_steered: u64,
    /// Intercepted SYNs that found no listener (the agent is not serving).
    pub lookups_no_listener: u64,
    /// Skbs that began before the direction's next byte: a retransmission
    /// queued whole by TCP, partly old data (see `proxy-ebpf` `overlap.rs`).
    pub overlap_skbs: u64,
    /// The old bytes trimmed from (or dropped with) those skbs: they would
    /// have reached the peer twice.
    pub overlap_bytes: u64,
    /// Overlapping skbs that could not be trimmed (too large an overlap, or
    /// no memory to pull the head): their old bytes went through again.
    pub overlap_untrimmed: u64,
}

const _: () = assert!(size_of::<GlobalStats>() == 72);

#[cfg(feature = "user")]
// SAFETY: repr(C), u64 fields only, no padding (checked above).
unsafe impl aya::Pod for GlobalStats {}
