//! What goes into the kernel's LPM trie for a given intercepted set.
//!
//! The trie answers with the longest matching prefix only. So each prefix's
//! value carries the union of its own ports and those of every configured
//! prefix that contains it; an address then gets exactly the ports the
//! configuration gives it.

use ipnet::IpNet;
use proxy_common::addr::{V4_MAPPED_PREFIX_BITS, v4_mapped};
use proxy_common::intercept::{InterceptValue, MAX_PORT_RANGES, PortRange};

use crate::config::InterceptSet;
use crate::dest::normalize_ports;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrieError {
    #[error(
        "{prefix} ends up with {ranges} port ranges (with the prefixes that contain it); the kernel map holds at most {MAX_PORT_RANGES}"
    )]
    TooManyRanges { prefix: IpNet, ranges: usize },
}

/// The trie key for a prefix: (prefix length in bits, 16-byte address).
#[must_use]
pub fn key(prefix: IpNet) -> (u32, [u8; 16]) {
    match prefix.trunc() {
        IpNet::V4(net) => (
            V4_MAPPED_PREFIX_BITS + u32::from(net.prefix_len()),
            v4_mapped(net.network().octets()),
        ),
        IpNet::V6(net) => (u32::from(net.prefix_len()), net.network().octets()),
    }
}

/// One trie entry per configured prefix.
pub fn entries(set: &InterceptSet) -> Result<Vec<(IpNet, InterceptValue)>, TrieError> {
    let mut out = Vec::with_capacity(set.entries.len());
    for entry in &set.entries {
        let prefix = entry.destination.prefix;
        let ranges = normalize_ports(
            set.entries
                .iter()
                .filter(|other| other.destination.prefix.contains(&prefix))
                .flat_map(|other| other.destination.ports.iter().copied())
                .collect(),
        );
        if ranges.len() > MAX_PORT_RANGES {
            return Err(TrieError::TooManyRanges {
                prefix,
                ranges: ranges.len(),
            });
        }
        let mut value = InterceptValue {
            rule_index: u32::try_from(entry.index).unwrap_or(u32::MAX),
            range_count: ranges.len() as u32,
            ranges: [PortRange::default(); MAX_PORT_RANGES],
        };
        for (slot, range) in value.ranges.iter_mut().zip(&ranges) {
            *slot = PortRange {
                first: range.first,
                last: range.last,
            };
        }
        out.push((prefix, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{test_section, test_set};

    #[test]
    fn nested_prefixes_inherit_covering_ports() {
        let set = test_set(&[
            ("192.0.2.0/24", &["5432"]),
            ("192.0.2.7", &["22"]),
            ("2001:db8::/64", &["1-65535"]),
        ]);
        let entries = entries(&set).expect("fits");
        let (prefix, host) = &entries[1];
        assert_eq!(prefix.to_string(), "192.0.2.7/32");
        assert_eq!(host.range_count, 2);
        assert!(host.contains(22) && host.contains(5432) && !host.contains(80));
        let (_, wide) = &entries[0];
        assert!(
            wide.contains(5432) && !wide.contains(22),
            "the /24 does not get the host's port"
        );
        assert_eq!(key("192.0.2.0/24".parse().expect("net")).0, 96 + 24);
        assert_eq!(
            key("2001:db8::1/64".parse().expect("net")),
            (
                64,
                "2001:db8::"
                    .parse::<std::net::Ipv6Addr>()
                    .expect("ip")
                    .octets()
            )
        );
    }

    #[test]
    fn userspace_lookup_agrees_with_longest_match() {
        let set = test_set(&[("192.0.2.0/24", &["5432"]), ("192.0.2.7", &["22"])]);
        let hit = set
            .lookup("192.0.2.7:5432".parse().expect("addr"))
            .expect("covered by /24");
        assert_eq!(hit.index, 0);
        assert_eq!(
            set.lookup("192.0.2.7:22".parse().expect("addr"))
                .expect("host")
                .index,
            1
        );
        assert!(set.lookup("192.0.2.8:22".parse().expect("addr")).is_none());
    }

    #[test]
    fn too_many_ranges_is_a_config_error() {
        let ports: Vec<String> = (0..40).map(|i| (1000 + i * 10).to_string()).collect();
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        let section = test_section(&[("192.0.2.0/24", &ports)]);
        let mut errors = Vec::new();
        section.resolve(&mut errors);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].message.contains("40 port ranges"),
            "{}",
            errors[0]
        );
    }
}
