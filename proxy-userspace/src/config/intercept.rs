//! `[intercept]`: which destinations the bastion takes over, and how.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::Deserialize;

use super::FieldError;
use crate::dest::{Destination, DestinationParseError, DestinationSpec, normalize_ports};

/// Default port of the transparent listeners on 127.0.0.1 and [::1].
pub const DEFAULT_LISTEN_PORT: u16 = 15001;
/// Default policy routing table for intercepted prefixes.
pub const DEFAULT_ROUTE_TABLE: u32 = 4765;
/// Default first rule priority; tcpgate owns this one and the next two.
pub const DEFAULT_RULE_PRIORITY: u32 = 4760;
/// Default firewall mark of intercepted packets ("tG").
pub const DEFAULT_MARK: u32 = 0x7447;

/// `[intercept]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptSection {
    /// Port of the transparent listeners (127.0.0.1 and [::1]).
    #[serde(default = "default_listen_port")]
    pub listen_port: u16,
    /// Routing table holding the local routes for intercepted traffic.
    #[serde(default = "default_route_table")]
    pub route_table: u32,
    /// First of the three rule priorities tcpgate owns.
    #[serde(default = "default_rule_priority")]
    pub rule_priority: u32,
    /// Interfaces that forwarded runner traffic arrives on. Unset: every
    /// interface except loopback, including those added later.
    #[serde(default)]
    pub interfaces: Option<Vec<String>>,
    /// Firewall mark the agent's nftables chains put on intercepted packets;
    /// one `ip rule fwmark` per family delivers them locally.
    #[serde(default = "default_mark")]
    pub mark: u32,
    /// More prefixes the guard table drops, besides every intercepted one.
    #[serde(default)]
    pub protect: Vec<String>,
    /// What the guard lets through to protected prefixes on purpose.
    #[serde(default)]
    pub pass: Vec<Pass>,
    /// The intercepted destinations.
    #[serde(default, rename = "prefix")]
    pub prefixes: Vec<InterceptPrefix>,
    /// `[intercept.routed_grants]`: opt-in routing of granted flows.
    #[serde(default)]
    pub routed_grants: Option<super::routed::RoutedGrantsSection>,
}

impl InterceptSection {
    /// The routed-grants section when it is enabled.
    #[must_use]
    pub fn routed(&self) -> Option<&super::routed::RoutedGrantsSection> {
        self.routed_grants.as_ref().filter(|r| r.enabled)
    }
}

const fn default_listen_port() -> u16 {
    DEFAULT_LISTEN_PORT
}
const fn default_route_table() -> u32 {
    DEFAULT_ROUTE_TABLE
}
const fn default_rule_priority() -> u32 {
    DEFAULT_RULE_PRIORITY
}
const fn default_mark() -> u32 {
    DEFAULT_MARK
}

/// `intercept.pass`: traffic the guard table lets through to protected
/// prefixes, both forwarded and from the bastion itself. Unintercepted TCP
/// and UDP are never on the list: they would pass while the agent is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    /// ICMP (ping, errors) to IPv4 protected prefixes.
    Icmp,
    /// ICMPv6 to IPv6 protected prefixes.
    Icmpv6,
}

/// `[[intercept.prefix]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptPrefix {
    /// CIDR prefix or single address.
    pub prefix: String,
    /// Ports or ranges, e.g. `["5432", "8000-8099"]`.
    pub ports: Vec<String>,
    /// Optional: connect here instead of the dialled address. `ip:port`, or
    /// an address alone to keep the dialled port (virtual service addresses).
    #[serde(default)]
    pub upstream: Option<String>,
}

/// Where an intercepted connection goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamMap {
    /// Exactly the address the client dialled.
    Original,
    /// Another address, same port.
    Host(IpAddr),
    /// A fixed address and port.
    Fixed(SocketAddr),
}

impl UpstreamMap {
    #[must_use]
    pub fn resolve(self, dialled: SocketAddr) -> SocketAddr {
        match self {
            Self::Original => dialled,
            Self::Host(ip) => SocketAddr::new(ip, dialled.port()),
            Self::Fixed(addr) => addr,
        }
    }
}

/// One validated intercepted destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptEntry {
    pub index: usize,
    pub destination: Destination,
    pub upstream: UpstreamMap,
}

/// The validated intercepted set, and what the guard table protects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterceptSet {
    pub entries: Vec<InterceptEntry>,
    /// `intercept.protect`: dropped besides the intercepted prefixes.
    pub protect: Vec<IpNet>,
    /// `intercept.pass`.
    pub pass: Vec<Pass>,
}

impl InterceptSet {
    /// The most specific entry covering `addr`, as the kernel's trie picks it.
    #[must_use]
    pub fn lookup(&self, addr: SocketAddr) -> Option<&InterceptEntry> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.entries
            .iter()
            .filter(|e| e.destination.contains(addr))
            .max_by_key(|e| e.destination.prefix.prefix_len())
    }

    #[must_use]
    pub fn destinations(&self) -> Vec<Destination> {
        self.entries.iter().map(|e| e.destination.clone()).collect()
    }

    /// Every prefix the guard table drops: the intercepted ones and
    /// `intercept.protect`.
    #[must_use]
    pub fn protected(&self) -> Vec<IpNet> {
        self.entries
            .iter()
            .map(|e| e.destination.prefix)
            .chain(self.protect.iter().copied())
            .collect()
    }
}

fn parse_upstream(text: &str) -> Option<UpstreamMap> {
    let text = text.trim();
    text.parse::<SocketAddr>()
        .ok()
        .filter(|a| a.port() != 0)
        .map(UpstreamMap::Fixed)
        .or_else(|| text.parse::<IpAddr>().ok().map(UpstreamMap::Host))
}

impl InterceptSection {
    /// Parses every entry, collecting errors under `intercept.prefix[i]`.
    pub fn resolve(&self, errors: &mut Vec<FieldError>) -> InterceptSet {
        if self.listen_port == 0 {
            errors.push(FieldError::new(
                "intercept.listen_port",
                "must be a port between 1 and 65535",
            ));
        }
        if matches!(self.route_table, 0 | 253..=255) {
            errors.push(FieldError::new(
                "intercept.route_table",
                "must not be 0 or a reserved table (253 default, 254 main, 255 local)",
            ));
        }
        if self.rule_priority == 0 || self.rule_priority > 32_000 {
            errors.push(FieldError::new(
                "intercept.rule_priority",
                "must be between 1 and 32000",
            ));
        }
        for (i, name) in self.interfaces.iter().flatten().enumerate() {
            // The name goes into an nftables rule: a plain charset keeps it
            // a literal (nft reads a trailing `+` as a wildcard, for one).
            let plain = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
            if name.is_empty() || name.len() > 15 || !plain || name == "lo" {
                errors.push(FieldError::new(
                    format!("intercept.interfaces[{i}]"),
                    format!(
                        "{name:?} is not a usable interface name (1-15 of A-Z a-z 0-9 - _ . @, not lo)"
                    ),
                ));
            }
        }
        if self.mark == 0 {
            errors.push(FieldError::new(
                "intercept.mark",
                "must be non-zero: it selects intercepted packets",
            ));
        }
        let mut set = InterceptSet {
            pass: self.pass.clone(),
            ..InterceptSet::default()
        };
        for (i, text) in self.protect.iter().enumerate() {
            match text.trim().parse::<IpNet>() {
                Ok(net) if net != net.trunc() => errors.push(FieldError::new(
                    format!("intercept.protect[{i}]"),
                    format!("{text:?} has host bits set; did you mean {}?", net.trunc()),
                )),
                Ok(net) if net.prefix_len() == 0 || net.network().is_loopback() => {
                    errors.push(FieldError::new(
                        format!("intercept.protect[{i}]"),
                        format!("{net} cannot be protected (a default route or loopback)"),
                    ));
                }
                Ok(net) => set.protect.push(net),
                Err(_) => errors.push(FieldError::new(
                    format!("intercept.protect[{i}]"),
                    format!("{text:?} is not a prefix such as 10.0.0.0/8"),
                )),
            }
        }
        for (index, entry) in self.prefixes.iter().enumerate() {
            let path = format!("intercept.prefix[{index}]");
            let spec = DestinationSpec {
                prefix: entry.prefix.clone(),
                ports: entry.ports.clone(),
            };
            let mut destination = match Destination::parse(&spec) {
                Ok(d) => d,
                Err(parse_errors) => {
                    for e in parse_errors {
                        let field = match e {
                            DestinationParseError::BadPrefix(_)
                            | DestinationParseError::HostBitsSet { .. } => "prefix",
                            _ => "ports",
                        };
                        errors.push(FieldError::new(format!("{path}.{field}"), e.to_string()));
                    }
                    continue;
                }
            };
            destination.ports = normalize_ports(destination.ports);
            if destination
                .ports
                .iter()
                .any(|r| r.last == u16::MAX && r.first != 1)
            {
                errors.push(FieldError::new(
                    format!("{path}.ports"),
                    "port 65535 can only be intercepted as part of the full range 1-65535 (a kernel policy-routing limit)",
                ));
                continue;
            }
            let net = destination.prefix;
            let network = net.network();
            if network.is_loopback()
                || network.is_unspecified()
                || network.is_multicast()
                || net.prefix_len() == 0
            {
                errors.push(FieldError::new(
                    format!("{path}.prefix"),
                    format!("{net} cannot be intercepted (loopback, unspecified, multicast or a default route)"),
                ));
                continue;
            }
            let upstream = match entry.upstream.as_deref() {
                None => UpstreamMap::Original,
                Some(text) => match parse_upstream(text) {
                    Some(map) => map,
                    None => {
                        errors.push(FieldError::new(
                            format!("{path}.upstream"),
                            format!("{text:?} is not an address or address:port"),
                        ));
                        continue;
                    }
                },
            };
            if set
                .entries
                .iter()
                .any(|e| e.destination.prefix == destination.prefix)
            {
                errors.push(FieldError::new(
                    format!("{path}.prefix"),
                    format!(
                        "{} is listed twice; merge the ports into one entry",
                        destination.prefix
                    ),
                ));
                continue;
            }
            set.entries.push(InterceptEntry {
                index,
                destination,
                upstream,
            });
        }
        if let Err(e) = super::trie::entries(&set) {
            errors.push(FieldError::new("intercept.prefix", e.to_string()));
        }
        set
    }
}

/// Test support: a section with the default settings and these prefixes.
#[cfg(test)]
pub(crate) fn test_section(entries: &[(&str, &[&str])]) -> InterceptSection {
    InterceptSection {
        listen_port: DEFAULT_LISTEN_PORT,
        route_table: DEFAULT_ROUTE_TABLE,
        rule_priority: DEFAULT_RULE_PRIORITY,
        interfaces: None,
        mark: DEFAULT_MARK,
        protect: Vec::new(),
        pass: Vec::new(),
        prefixes: entries
            .iter()
            .map(|(p, ports)| InterceptPrefix {
                prefix: (*p).to_owned(),
                ports: ports.iter().map(|s| (*s).to_owned()).collect(),
                upstream: None,
            })
            .collect(),
        routed_grants: None,
    }
}

/// Test support: the resolved set for these prefixes; panics on errors.
#[cfg(test)]
pub(crate) fn test_set(entries: &[(&str, &[&str])]) -> InterceptSet {
    let mut errors = Vec::new();
    let set = test_section(entries).resolve(&mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    set
}
