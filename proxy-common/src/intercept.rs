//! The intercepted set: an LPM trie of prefixes, each with port ranges.
//!
//! The trie key is aya's LPM key: a `u32` prefix length (host order) plus the
//! 16-byte address form of [`crate::addr`]; an IPv4 prefix `/n` is stored as
//! the IPv4-mapped prefix `/(96 + n)`.

/// Port ranges one trie entry can hold.
pub const MAX_PORT_RANGES: usize = 32;

/// Listener slot in the `LISTENERS` SOCKMAP for IPv4 connections.
pub const LISTENER_V4: u32 = 0;
/// Listener slot in the `LISTENERS` SOCKMAP for IPv6 connections.
pub const LISTENER_V6: u32 = 1;

/// An inclusive port range, host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    /// First port in the range.
    pub first: u16,
    /// Last port in the range (inclusive).
    pub last: u16,
}

/// Value of the `INTERCEPT` trie.
///
/// User space stores, for each prefix, the union of the port ranges of every
/// configured prefix that covers it, because the trie answers only with the
/// longest match.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterceptValue {
    /// Index of the configured intercept entry (for operators).
    pub rule_index: u32,
    /// How many entries of `ranges` are in use.
    pub range_count: u32,
    /// Sorted, non-overlapping port ranges.
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

impl InterceptValue {
    /// Whether `port` lies in one of the used ranges.
    #[must_use]
    pub fn contains(&self, port: u16) -> bool {
        let used = (self.range_count as usize).min(MAX_PORT_RANGES);
        self.ranges[..used]
            .iter()
            .any(|r| r.first <= port && port <= r.last)
    }
}

const _: () = assert!(size_of::<PortRange>() == 4);
const _: () = assert!(size_of::<InterceptValue>() == 8 + 4 * MAX_PORT_RANGES);

#[cfg(feature = "user")]
// SAFETY: repr(C), u16 fields only, no padding (checked above).
unsafe impl aya::Pod for PortRange {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers and arrays only, no padding (checked above).
unsafe impl aya::Pod for InterceptValue {}
