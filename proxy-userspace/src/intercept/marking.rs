//! The intercept table (`inet tcpgate_intercept`): marks the packets to
//! intercept, whatever interface or source address they come with.
//!
//! - `prerouting` (filter, priority mangle): forwarded traffic, from every
//!   interface but `lo` (or `intercept.interfaces`, matched by name, so an
//!   interface added later counts as soon as it appears).
//! - `output` (type route, priority mangle): the bastion's own processes,
//!   whatever source address they bound. A route chain re-routes a packet
//!   whose mark it changed, so the connection is delivered locally; the
//!   agent's upstream sockets carry `agent.upstream_mark` and are skipped.
//!
//! One `ip rule fwmark <mark> lookup <table>` per family (see `routing`)
//! then sends marked packets to the local route, where the sk_lookup
//! program steers them to the agent. Nothing matches on destination alone:
//! the kernel's reverse-path lookups for the upstream's replies carry mark 0.
//!
//! A destination is marked when any configured prefix covering it lists
//! its port: exactly what the sk_lookup program's trie holds (a prefix's
//! value carries the ports of every prefix containing it, see `trie`), so
//! nothing is delivered locally that the program would not steer, where a
//! service bound to a wildcard address on the bastion could answer.
//! Live sessions that a reload took out of the set stay marked through the
//! `pinned4`/`pinned6` sets until they end.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use ipnet::IpNet;

use crate::config::InterceptSet;
use crate::config::TargetSees;
use crate::dest::PortRange;
use crate::firewall::{FirewallError, NftRunner, remove_table, replace_script};

/// The intercept table: `inet tcpgate_intercept`.
pub const TABLE: &str = "tcpgate_intercept";

/// The marks and interfaces the table is written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkingParams {
    /// `intercept.mark`.
    pub mark: u32,
    /// `agent.upstream_mark`.
    pub upstream_mark: u32,
    /// `intercept.interfaces`; `None`: all but `lo`.
    pub interfaces: Option<Vec<String>>,
    /// Routed grants, when on: packets the tc program marked are
    /// forwarded, never intercepted.
    pub routed: Option<RoutedMarking>,
}

/// What the intercept table does for routed grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutedMarking {
    /// `intercept.routed_grants.mark`.
    pub mark: u32,
    /// `intercept.routed_grants.target_sees`: with `bastion`, a
    /// `postrouting` NAT chain masquerades the flows' first packets
    /// (connection tracking rewrites the rest, both ways).
    pub target_sees: TargetSees,
}

impl RoutedMarking {
    /// From the section, when routed grants are on.
    #[must_use]
    pub fn of(section: &crate::config::InterceptSection) -> Option<Self> {
        section.routed().map(|r| Self {
            mark: r.mark,
            target_sees: r.target_sees,
        })
    }
}

/// One live session kept intercepted after its prefix left the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin {
    pub client: SocketAddr,
    pub destination: SocketAddr,
}

impl Pin {
    /// `saddr . sport . daddr . dport`, and which set it belongs to.
    fn element(self) -> (&'static str, String) {
        let (client, destination) = (
            self.client.ip().to_canonical(),
            self.destination.ip().to_canonical(),
        );
        let set = if destination.is_ipv6() {
            "pinned6"
        } else {
            "pinned4"
        };
        (
            set,
            format!(
                "{client} . {} . {destination} . {}",
                self.client.port(),
                self.destination.port()
            ),
        )
    }
}

fn ports(ranges: &[PortRange]) -> String {
    let full = PortRange {
        first: 1,
        last: u16::MAX,
    };
    if ranges.contains(&full) {
        return "meta l4proto tcp".to_owned();
    }
    let list: Vec<String> = ranges
        .iter()
        .map(|r| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}-{}", r.first, r.last)
            }
        })
        .collect();
    format!("tcp dport {{ {} }}", list.join(", "))
}

/// The table's body, in nft syntax.
#[must_use]
pub fn ruleset(set: &InterceptSet, params: &MarkingParams, pins: &[Pin]) -> String {
    let mark = format!("meta mark set {:#x}", params.mark);
    let mut sets: HashMap<&str, Vec<String>> = HashMap::new();
    for pin in pins {
        let (name, element) = pin.element();
        sets.entry(name).or_default().push(element);
    }
    let mut out = String::new();
    for (name, family) in [("pinned4", "ipv4_addr"), ("pinned6", "ipv6_addr")] {
        let _ = write!(
            out,
            "\tset {name} {{\n\t\ttype {family} . inet_service . {family} . inet_service\n"
        );
        if let Some(elements) = sets.get(name) {
            let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
        }
        out.push_str("\t}\n");
    }
    let origin = match &params.interfaces {
        None => "\t\tiifname \"lo\" return\n".to_owned(),
        Some(names) => {
            let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            format!("\t\tiifname != {{ {} }} return\n", quoted.join(", "))
        }
    };
    let routed = params
        .routed
        .map(|r| format!("\t\tmeta mark {:#x} return\n", r.mark))
        .unwrap_or_default();
    let _ = write!(
        out,
        "\tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority mangle; policy accept;\n\
         {origin}\
         {routed}\
         \t\tjump select\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype route hook output priority mangle; policy accept;\n\
         \t\tmeta mark {upstream:#x} return\n\
         \t\tjump select\n\
         \t}}\n\
         \tchain select {{\n\
         \t\tip saddr . tcp sport . ip daddr . tcp dport @pinned4 {mark} return\n\
         \t\tip6 saddr . tcp sport . ip6 daddr . tcp dport @pinned6 {mark} return\n",
        upstream = params.upstream_mark,
    );
    for entry in &set.entries {
        let prefix = entry.destination.prefix;
        let family = match prefix {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        let _ = writeln!(
            out,
            "\t\t{family} daddr {prefix} {} {mark} return",
            ports(&entry.destination.ports)
        );
    }
    out.push_str("\t}\n");
    if let Some(r) = params
        .routed
        .filter(|r| r.target_sees == TargetSees::Bastion)
    {
        // A nat chain sees a connection's first packet only (the SYN the
        // tc program marked): connection tracking rewrites the rest, both
        // ways, and the agent's RSTs toward the target too.
        let _ = write!(
            out,
            "\tchain routed_snat {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark {:#x} masquerade\n\
             \t}}\n",
            r.mark
        );
    }
    out
}

/// Applies and removes the intercept table.
pub struct Marking {
    runner: Box<dyn NftRunner>,
}

impl Marking {
    pub fn new(runner: Box<dyn NftRunner>) -> Self {
        Self { runner }
    }

    /// Installs or replaces the table in one transaction.
    pub fn install(
        &self,
        set: &InterceptSet,
        params: &MarkingParams,
        pins: &[Pin],
    ) -> Result<(), FirewallError> {
        self.runner
            .apply(&replace_script(TABLE, &ruleset(set, params, pins)))
    }

    /// Stops marking one pinned session.
    pub fn unpin(&self, pin: Pin) -> Result<(), FirewallError> {
        let (set, element) = pin.element();
        self.runner.apply(&format!(
            "delete element inet {TABLE} {set} {{ {element} }}\n"
        ))
    }

    /// Removes the table; says whether it was there.
    pub fn remove(&self) -> Result<bool, FirewallError> {
        remove_table(self.runner.as_ref(), TABLE)
    }
}

#[cfg(test)]
mod tests;
