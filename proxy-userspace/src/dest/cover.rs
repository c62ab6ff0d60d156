//! Sets of destinations: merging port ranges, and whether a set contains
//! an address or covers another destination exactly.

use std::net::SocketAddr;

use ipnet::IpNet;

use super::{Destination, PortRange};

/// Sorts and merges overlapping or adjacent ranges.
#[must_use]
pub fn normalize_ports(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(range.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(range.last);
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// Whether any destination in `set` contains `addr`.
pub fn set_contains(set: &[Destination], addr: SocketAddr) -> bool {
    set.iter().any(|d| d.contains(addr))
}

/// Whether every address and port of `inner` lies inside the union of `outer`.
pub fn is_covered(inner: &Destination, outer: &[Destination]) -> bool {
    inner
        .ports
        .iter()
        .all(|r| prefix_ports_covered(inner.prefix, *r, outer))
}

/// The prefix/ports pair is covered when the entries containing the whole
/// prefix cover the ports; failing that, when both halves of the prefix are
/// covered, which only helps while some entry lies strictly inside it.
fn prefix_ports_covered(prefix: IpNet, ports: PortRange, outer: &[Destination]) -> bool {
    let containing: Vec<&[PortRange]> = outer
        .iter()
        .filter(|d| same_family(d.prefix, prefix) && d.prefix.contains(&prefix))
        .map(|d| d.ports.as_slice())
        .collect();
    if ports_covered(ports, &containing) {
        return true;
    }
    let finer_inside = outer.iter().any(|d| {
        same_family(d.prefix, prefix)
            && d.prefix.prefix_len() > prefix.prefix_len()
            && prefix.contains(&d.prefix)
    });
    if !finer_inside {
        return false;
    }
    match prefix.subnets(prefix.prefix_len() + 1) {
        Ok(halves) => halves
            .into_iter()
            .all(|half| prefix_ports_covered(half, ports, outer)),
        Err(_) => false,
    }
}

fn same_family(a: IpNet, b: IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

/// Whether the union of the port range lists covers `want`.
fn ports_covered(want: PortRange, lists: &[&[PortRange]]) -> bool {
    let mut ranges: Vec<PortRange> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    ranges.sort();
    let mut next = u32::from(want.first);
    for r in ranges {
        if u32::from(r.first) > next {
            break;
        }
        next = next.max(u32::from(r.last) + 1);
        if next > u32::from(want.last) {
            return true;
        }
    }
    next > u32::from(want.last)
}
