//! Destinations: an IP prefix with a set of TCP ports. Used by the
//! intercepted set and by policy rules, which must lie inside it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    #[must_use]
    pub const fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("{0:?} is not a port or a range like \"8000-8099\"")]
    Syntax(String),
    #[error("port 0 is not a valid destination port")]
    Zero,
    #[error("range {0}-{1} is reversed")]
    Reversed(u16, u16),
}

impl FromStr for PortRange {
    type Err = PortError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let parse = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| PortError::Syntax(text.to_owned()))
        };
        let (first, last) = match text.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let port = parse(text)?;
                (port, port)
            }
        };
        if first == 0 {
            return Err(PortError::Zero);
        }
        if first > last {
            return Err(PortError::Reversed(first, last));
        }
        Ok(Self { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A normalised set of ports: sorted, merged ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortSet(Vec<PortRange>);

impl PortSet {
    /// Builds a set, merging overlapping and adjacent ranges.
    #[must_use]
    pub fn new(mut ranges: Vec<PortRange>) -> Self {
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
        Self(merged)
    }

    #[must_use]
    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    #[must_use]
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }

    /// Whether every port of `self` is in `other`.
    #[must_use]
    pub fn is_subset(&self, other: &Self) -> bool {
        self.0.iter().all(|r| {
            other
                .0
                .iter()
                .any(|o| o.first <= r.first && r.last <= o.last)
        })
    }

    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        Self::new(self.0.iter().chain(&other.0).copied().collect())
    }

    /// Parses a list like `["5432", "8000-8099"]`, reporting the first bad entry.
    pub fn parse_list(items: &[String]) -> Result<Self, PortError> {
        items
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

/// A prefix and the TCP ports on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Always truncated to its network address.
    pub prefix: IpNet,
    pub ports: PortSet,
}

impl Destination {
    #[must_use]
    pub fn new(prefix: IpNet, ports: PortSet) -> Self {
        Self {
            prefix: prefix.trunc(),
            ports,
        }
    }

    #[must_use]
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.prefix.contains(&canonical_ip(addr.ip())) && self.ports.contains(addr.port())
    }

    /// Whether every address and port of `self` is covered by `others`
    /// taken together (per port, by the union of the covering prefixes).
    #[must_use]
    pub fn is_within(&self, others: &[Self]) -> bool {
        let covering = others
            .iter()
            .filter(|o| o.prefix.contains(&self.prefix))
            .fold(PortSet::default(), |acc, o| acc.union(&o.ports));
        self.ports.is_subset(&covering)
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} tcp/{}", self.prefix, self.ports)
    }
}

/// A destination as written in configuration files and API bodies:
/// `{ prefix = "192.0.2.0/24", ports = ["5432"] }`. A bare address is a
/// single-host prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    pub prefix: String,
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("prefix {0:?} is not an IPv4/IPv6 address or CIDR prefix")]
    Prefix(String),
    #[error("ports: {0}")]
    Ports(#[source] PortError),
    #[error("ports must list at least one port or range")]
    NoPorts,
}

impl DestinationSpec {
    pub fn parse(&self) -> Result<Destination, DestinationError> {
        let prefix = parse_prefix(&self.prefix)
            .ok_or_else(|| DestinationError::Prefix(self.prefix.clone()))?;
        if self.ports.is_empty() {
            return Err(DestinationError::NoPorts);
        }
        let ports = PortSet::parse_list(&self.ports).map_err(DestinationError::Ports)?;
        Ok(Destination::new(prefix, ports))
    }
}

/// Parses `192.0.2.0/24`, `2001:db8::/64` or a bare address (a /32 or /128).
#[must_use]
pub fn parse_prefix(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry.
#[must_use]
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(prefix: &str, ports: &[&str]) -> Destination {
        DestinationSpec {
            prefix: prefix.into(),
            ports: ports.iter().map(|s| (*s).to_owned()).collect(),
        }
        .parse()
        .expect("valid")
    }

    #[test]
    fn ports_parse_merge_and_reject_bad_input() {
        let set = PortSet::parse_list(&[
            "22".into(),
            "20-21".into(),
            "8000-8099".into(),
            "8050-8100".into(),
        ])
        .expect("valid");
        assert_eq!(set.to_string(), "20-22,8000-8100");
        assert_eq!("0".parse::<PortRange>(), Err(PortError::Zero));
        assert_eq!("10-5".parse::<PortRange>(), Err(PortError::Reversed(10, 5)));
        assert!(matches!(
            "http".parse::<PortRange>(),
            Err(PortError::Syntax(_))
        ));
        assert!(matches!(
            "70000".parse::<PortRange>(),
            Err(PortError::Syntax(_))
        ));
    }

    #[test]
    fn destination_contains_and_within() {
        let db = dest("192.0.2.10", &["5432"]);
        assert_eq!(db.prefix.to_string(), "192.0.2.10/32");
        assert!(db.contains("192.0.2.10:5432".parse().expect("addr")));
        assert!(db.contains("[::ffff:192.0.2.10]:5432".parse().expect("addr")));
        assert!(!db.contains("192.0.2.10:5433".parse().expect("addr")));
        let intercepted = [
            dest("192.0.2.0/24", &["5432"]),
            dest("192.0.2.0/25", &["22"]),
        ];
        assert!(db.is_within(&intercepted));
        assert!(dest("192.0.2.0/26", &["22", "5432"]).is_within(&intercepted));
        assert!(
            !dest("192.0.2.128/26", &["22"]).is_within(&intercepted),
            "/25 covers only the low half"
        );
        assert!(!dest("192.0.0.0/16", &["5432"]).is_within(&intercepted));
        assert!(
            dest("2001:db8::/64", &["1-65535"]).is_within(&[dest("2001:db8::/48", &["1-65535"])])
        );
    }

    #[test]
    fn bad_specs_are_specific() {
        let bad = DestinationSpec {
            prefix: "192.0.2.0/33".into(),
            ports: vec!["1".into()],
        };
        assert_eq!(
            bad.parse(),
            Err(DestinationError::Prefix("192.0.2.0/33".into()))
        );
        let bad = DestinationSpec {
            prefix: "192.0.2.0/24".into(),
            ports: vec![],
        };
        assert_eq!(bad.parse(), Err(DestinationError::NoPorts));
    }
}
