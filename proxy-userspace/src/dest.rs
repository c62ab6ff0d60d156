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

mod cover;
pub use cover::{is_covered, normalize_ports, set_contains};

#[cfg(test)]
mod tests;
