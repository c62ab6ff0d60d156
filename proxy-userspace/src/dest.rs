//! Destinations: an address prefix plus a set of port ranges.
//!
//! Shared by the policy (what a rule allows), the grant API (what a client
//! asks for) and interception (what the bastion takes over). Covering is exact: a prefix
//! split across several entries (`10.0.0.0/24` + `10.0.1.0/24` covering
//! `10.0.0.0/23`) counts as covered.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An inclusive range of TCP ports, `first..=last`, never containing 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// Why a port or destination string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationParseError {
    #[error("port `{0}` is not a number between 1 and 65535")]
    BadPort(String),
    #[error("port range `{0}` has its first port above its last")]
    ReversedRange(String),
    #[error("`{0}` is neither an IP address nor a CIDR prefix")]
    BadPrefix(String),
    #[error("prefix `{prefix}` has host bits set; did you mean `{network}`?")]
    HostBitsSet { prefix: String, network: IpNet },
    #[error("a destination needs at least one port")]
    NoPorts,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl FromStr for PortRange {
    type Err = DestinationParseError;

    /// Parses `"5432"` or `"8000-8099"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(DestinationParseError::BadPort(s.to_owned())),
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(DestinationParseError::ReversedRange(s.to_owned()));
        }
        Ok(PortRange { first, last })
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

/// Parses a CIDR prefix or a single address (as a /32 or /128). Host bits
/// must be clear: `192.0.2.7/24` is almost always a typo.
pub fn parse_prefix(s: &str) -> Result<IpNet, DestinationParseError> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(DestinationParseError::HostBitsSet {
                prefix: s.to_owned(),
                network: net.trunc(),
            });
        }
        return Ok(canonical_net(net));
    }
    s.parse::<IpAddr>()
        .map(|ip| canonical_net(IpNet::from(ip)))
        .map_err(|_| DestinationParseError::BadPrefix(s.to_owned()))
}

/// `::ffff:a.b.c.d/(96+n)` is the IPv4 prefix `a.b.c.d/n`.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

/// A set of destinations: an address prefix and the ports allowed on it.
/// On the wire (config, grant API) it is `{ prefix = "...", ports = ["..."] }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub prefix: IpNet,
    pub ports: Vec<PortRange>,
}

/// The serde form: plain strings, parsed by [`Destination::parse`] so that
/// config validation can report every bad entry with its path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    pub prefix: String,
    pub ports: Vec<String>,
}

impl Destination {
    /// Parses the spec, reporting every bad part (prefix and each port).
    pub fn parse(spec: &DestinationSpec) -> Result<Destination, Vec<DestinationParseError>> {
        let mut errors = Vec::new();
        let prefix = parse_prefix(&spec.prefix).map_err(|e| errors.push(e)).ok();
        let mut ports = Vec::with_capacity(spec.ports.len());
        for p in &spec.ports {
            match p.parse::<PortRange>() {
                Ok(r) => ports.push(r),
                Err(e) => errors.push(e),
            }
        }
        if spec.ports.is_empty() {
            errors.push(DestinationParseError::NoPorts);
        }
        match prefix {
            Some(prefix) if errors.is_empty() => Ok(Destination { prefix, ports }),
            _ => Err(errors),
        }
    }

    pub fn to_spec(&self) -> DestinationSpec {
        DestinationSpec {
            prefix: self.prefix.to_string(),
            ports: self.ports.iter().map(ToString::to_string).collect(),
        }
    }

    /// Whether this destination includes `addr`. IPv4-mapped IPv6 addresses
    /// are treated as their IPv4 form.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.prefix.contains(&addr.ip().to_canonical())
            && self.ports.iter().any(|r| r.contains(addr.port()))
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} port", self.prefix)?;
        if self.ports.len() > 1 {
            f.write_str("s")?;
        }
        for (i, r) in self.ports.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { "," })?;
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_spec().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spec = DestinationSpec::deserialize(d)?;
        Destination::parse(&spec).map_err(|errors| {
            let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
            serde::de::Error::custom(msgs.join("; "))
        })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_merges_overlapping_and_adjacent_ranges() {
        let r = |first, last| PortRange { first, last };
        assert_eq!(
            normalize_ports(vec![r(8050, 8100), r(22, 22), r(20, 21), r(8000, 8099)]),
            [r(20, 22), r(8000, 8100)]
        );
        assert!(normalize_ports(Vec::new()).is_empty());
    }

    fn dest(prefix: &str, ports: &[&str]) -> Destination {
        Destination::parse(&DestinationSpec {
            prefix: prefix.into(),
            ports: ports.iter().map(|p| p.to_string()).collect(),
        })
        .expect("valid destination")
    }

    #[test]
    fn parses_ports_and_ranges() {
        assert_eq!(
            "5432".parse(),
            Ok(PortRange {
                first: 5432,
                last: 5432
            })
        );
        assert_eq!(
            "1-1024".parse(),
            Ok(PortRange {
                first: 1,
                last: 1024
            })
        );
        assert!(matches!(
            "0".parse::<PortRange>(),
            Err(DestinationParseError::BadPort(_))
        ));
        assert!(matches!(
            "65536".parse::<PortRange>(),
            Err(DestinationParseError::BadPort(_))
        ));
        assert!(matches!(
            "x".parse::<PortRange>(),
            Err(DestinationParseError::BadPort(_))
        ));
        assert!(matches!(
            "90-80".parse::<PortRange>(),
            Err(DestinationParseError::ReversedRange(_))
        ));
    }

    #[test]
    fn parses_prefixes_and_single_addresses() {
        assert_eq!(
            parse_prefix("192.0.2.10").map(|n| n.to_string()),
            Ok("192.0.2.10/32".into())
        );
        assert_eq!(
            parse_prefix("2001:db8::/64").map(|n| n.to_string()),
            Ok("2001:db8::/64".into())
        );
        assert_eq!(
            parse_prefix("::ffff:192.0.2.0/120").map(|n| n.to_string()),
            Ok("192.0.2.0/24".into())
        );
        assert!(matches!(
            parse_prefix("192.0.2.7/24"),
            Err(DestinationParseError::HostBitsSet { .. })
        ));
        assert!(matches!(
            parse_prefix("nope"),
            Err(DestinationParseError::BadPrefix(_))
        ));
    }

    #[test]
    fn parse_reports_every_bad_part() {
        let spec = DestinationSpec {
            prefix: "bad".into(),
            ports: vec!["0".into(), "9-1".into()],
        };
        assert_eq!(Destination::parse(&spec).map_err(|e| e.len()), Err(3));
    }

    #[test]
    fn contains_checks_address_and_port_and_maps_v4_in_v6() {
        let d = dest("192.0.2.0/24", &["5432", "8000-8099"]);
        assert!(d.contains("192.0.2.10:5432".parse().expect("addr")));
        assert!(d.contains("192.0.2.10:8050".parse().expect("addr")));
        assert!(d.contains("[::ffff:192.0.2.10]:5432".parse().expect("addr")));
        assert!(!d.contains("192.0.2.10:22".parse().expect("addr")));
        assert!(!d.contains("198.51.100.1:5432".parse().expect("addr")));
    }

    #[test]
    fn covering_handles_unions_of_ports_and_split_prefixes() {
        let outer = [
            dest("10.0.0.0/24", &["1-100"]),
            dest("10.0.1.0/24", &["1-100"]),
            dest("10.0.0.0/23", &["101-200"]),
        ];
        assert!(is_covered(&dest("10.0.0.0/23", &["50-150"]), &outer));
        assert!(is_covered(&dest("10.0.0.128/25", &["1-200"]), &outer));
        assert!(!is_covered(&dest("10.0.0.0/22", &["50"]), &outer));
        assert!(!is_covered(&dest("10.0.0.0/23", &["201"]), &outer));
        assert!(!is_covered(&dest("2001:db8::/64", &["50"]), &outer));
        let v6 = [dest("2001:db8::/32", &["22"])];
        assert!(is_covered(&dest("2001:db8::/64", &["22"]), &v6));
        assert!(!is_covered(&dest("2001:db8::/64", &["22-23"]), &v6));
    }

    #[test]
    fn serde_round_trip_uses_strings() {
        let d = dest("2001:db8::/64", &["22", "8000-8099"]);
        let json = serde_json::to_string(&d).expect("serialize");
        assert_eq!(
            json,
            r#"{"prefix":"2001:db8::/64","ports":["22","8000-8099"]}"#
        );
        assert_eq!(
            serde_json::from_str::<Destination>(&json).expect("deserialize"),
            d
        );
        assert!(serde_json::from_str::<Destination>(r#"{"prefix":"x","ports":[]}"#).is_err());
    }
}
