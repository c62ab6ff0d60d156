//! How large the maps are made at load time, from the configuration.

/// Sizes of the maps, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    pub max_sessions: u32,
    /// Entries of the pinned `grants` map: one per preamble session, plus
    /// every source grant the caps allow (a grant that does not fit is
    /// refused, never hidden from operators).
    pub grants: u32,
    /// `offsetof(struct sk_buff, cb)` in the running kernel, or 0 when
    /// unknown (the verdict then cannot see TCP sequence numbers; see
    /// [`crate::kernel_btf`]).
    pub skb_cb_offset: u32,
    /// Entries of `FLOWS` (`intercept.routed_grants.max_flows`; 1 when off).
    pub flows: u32,
}

/// Largest `FLOW_EVENTS` ring: past it, a lost event costs one whole read
/// of `FLOWS`, which is cheaper than pinning more kernel memory.
const MAX_FLOW_EVENTS_BYTES: u64 = 16 << 20;

/// Bytes of the `FLOW_EVENTS` ring for `flows` flows: room for about four
/// events per flow (its opening, the target's answer, a FIN each way),
/// a power of two of pages as the kernel requires, at most
/// [`MAX_FLOW_EVENTS_BYTES`].
pub(super) fn flow_events_bytes(flows: u32) -> u32 {
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let page = page.max(4096).next_power_of_two();
    let wanted = (u64::from(flows) * 512).next_power_of_two();
    let bytes = wanted.clamp(page, MAX_FLOW_EVENTS_BYTES.max(page));
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_events_ring_is_a_power_of_two_of_pages_and_bounded() {
        // Routed grants off (one flow): one page.
        assert_eq!(flow_events_bytes(1), 4096);
        // The default 4,096 flows: 512 bytes each.
        assert_eq!(flow_events_bytes(4096), 2 << 20);
        // Rounded up to a power of two.
        assert_eq!(flow_events_bytes(5000), 4 << 20);
        // The largest max_flows is capped.
        assert_eq!(flow_events_bytes(1 << 20), 16 << 20);
        assert_eq!(flow_events_bytes(u32::MAX), 16 << 20);
    }
}
