//! The guard table: fail closed at the packet level.
//!
//! Every protected prefix (each `[[intercept.prefix]]` and
//! `intercept.protect`) is dropped, all ports and protocols:
//! - `forward`: whatever the bastion would route to it. Intercepted
//!   connections are delivered locally and never reach this hook, so they
//!   work while everything else is dropped.
//! - `output`: the bastion's own processes, except packets carrying the
//!   agent's upstream mark (`agent.upstream_mark`) or the intercept mark
//!   (`intercept.mark`: delivered to the agent), destinations that are the
//!   bastion's own addresses, and IPv6 neighbour discovery, which unicasts
//!   solicitations to on-link targets.
//!
//! `intercept.pass` opens ICMP or ICMPv6 on purpose. The table does not
//! depend on the agent: after a stop or a crash, nothing passes until the
//! agent is back, or until an operator removes the table.

use std::fmt::Write as _;

use ipnet::IpNet;

use super::{FirewallError, NftRunner, remove_table, replace_script};
use crate::config::{InterceptSet, Pass};

/// The guard's table: `inet tcpgate_guard`.
pub const TABLE: &str = "tcpgate_guard";

/// What the guard drops and lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub protected: Vec<IpNet>,
    pub pass: Vec<Pass>,
    /// `agent.upstream_mark`.
    pub upstream_mark: u32,
    /// `intercept.mark`.
    pub intercept_mark: u32,
    /// `intercept.routed_grants.mark`: forwarded packets of flows the tc
    /// program admitted (it clears the mark on every other packet).
    pub routed_mark: Option<u32>,
}

impl Guard {
    #[must_use]
    pub fn new(set: &InterceptSet, upstream_mark: u32, intercept_mark: u32) -> Self {
        Self {
            protected: set.protected(),
            pass: set.pass.clone(),
            upstream_mark,
            intercept_mark,
            routed_mark: None,
        }
    }

    /// The guard with routed grants on (see [`Guard::routed_mark`]).
    #[must_use]
    pub fn with_routed(mut self, mark: Option<u32>) -> Self {
        self.routed_mark = mark;
        self
    }

    /// The table's body, in nft syntax.
    #[must_use]
    pub fn ruleset(&self) -> String {
        // Anonymous interval sets refuse overlapping elements; nested
        // prefixes are valid in the config.
        let merged = IpNet::aggregate(&self.protected);
        let v4 = elements(merged.iter().filter(|n| matches!(n, IpNet::V4(_))));
        let v6 = elements(merged.iter().filter(|n| matches!(n, IpNet::V6(_))));
        let to_protected = |target: &str| {
            let mut rules = String::new();
            for (family, set) in [("ip", &v4), ("ip6", &v6)] {
                if let Some(set) = set {
                    let _ = writeln!(rules, "\t\t{family} daddr {set} jump {target}");
                }
            }
            rules
        };
        let mut pass = String::new();
        for p in &self.pass {
            let proto = match p {
                Pass::Icmp => "icmp",
                Pass::Icmpv6 => "ipv6-icmp",
            };
            let _ = writeln!(pass, "\t\tmeta l4proto {proto} accept");
        }
        let routed = self
            .routed_mark
            .map(|m| format!("\t\tmeta mark {m:#x} accept\n"))
            .unwrap_or_default();
        format!(
            "\tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             {routed}\
             {forward}\
             \t}}\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             {output}\
             \t}}\n\
             \tchain local {{\n\
             \t\tmeta mark {{ {upstream:#x}, {intercept:#x} }} accept\n\
             \t\tfib daddr type local accept\n\
             \t\ticmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept\n\
             \t\tjump protected\n\
             \t}}\n\
             \tchain protected {{\n\
             {pass}\
             \t\tcounter drop\n\
             \t}}\n",
            forward = to_protected("protected"),
            output = to_protected("local"),
            upstream = self.upstream_mark,
            intercept = self.intercept_mark,
        )
    }
}

/// `{ a, b }`, or `None` for no element (nft has no empty anonymous set).
fn elements<'a>(nets: impl Iterator<Item = &'a IpNet>) -> Option<String> {
    let list: Vec<String> = nets.map(ToString::to_string).collect();
    (!list.is_empty()).then(|| format!("{{ {} }}", list.join(", ")))
}

/// Installs or replaces the guard table in one transaction.
pub fn install(runner: &dyn NftRunner, guard: &Guard) -> Result<(), FirewallError> {
    runner.apply(&replace_script(TABLE, &guard.ruleset()))
}

/// Removes the guard table; says whether it was there.
pub fn remove(runner: &dyn NftRunner) -> Result<bool, FirewallError> {
    remove_table(runner, TABLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_set;

    fn guard(pass: &[Pass], protect: &[&str]) -> Guard {
        let mut set = test_set(&[
            ("192.0.2.0/24", &["80"]),
            ("192.0.2.10/32", &["5432"]),
            ("2001:db8:2::/64", &["80"]),
        ]);
        set.pass = pass.to_vec();
        set.protect = protect.iter().map(|p| p.parse().expect("prefix")).collect();
        Guard::new(&set, 0x7467, 0x7447)
    }

    #[test]
    fn every_protected_prefix_is_dropped_forwarded_and_local() {
        let rules = guard(&[], &["10.0.0.0/8"]).ruleset();
        let forward = rules.split("chain output").next().expect("forward chain");
        // Nested prefixes merge (nft refuses overlapping set elements).
        assert!(
            forward.contains("ip daddr { 10.0.0.0/8, 192.0.2.0/24 } jump protected"),
            "{rules}"
        );
        assert!(
            forward.contains("ip6 daddr { 2001:db8:2::/64 } jump protected"),
            "{rules}"
        );
        assert!(
            rules.contains("ip daddr { 10.0.0.0/8, 192.0.2.0/24 } jump local"),
            "{rules}"
        );
        assert!(rules.contains("hook forward priority filter; policy accept;"));
        assert!(rules.contains("hook output priority filter; policy accept;"));
        // All ports and protocols: the drop names neither.
        let protected = rules.split("chain protected").nth(1).expect("chain");
        assert_eq!(protected.trim(), "{\n\t\tcounter drop\n\t}", "{rules}");
    }

    #[test]
    fn local_exemptions_are_the_agents_marks_own_addresses_and_neighbour_discovery() {
        let rules = guard(&[], &[]).ruleset();
        let local = rules
            .split("chain local {")
            .nth(1)
            .and_then(|c| c.split("\t}").next())
            .expect("local chain");
        let lines: Vec<&str> = local
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            lines,
            [
                "meta mark { 0x7467, 0x7447 } accept",
                "fib daddr type local accept",
                "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept",
                "jump protected",
            ]
        );
    }

    #[test]
    fn pass_opens_only_the_named_protocols() {
        let rules = guard(&[Pass::Icmp, Pass::Icmpv6], &[]).ruleset();
        let protected = rules.split("chain protected").nth(1).expect("chain");
        assert!(
            protected.contains(
                "meta l4proto icmp accept\n\t\tmeta l4proto ipv6-icmp accept\n\t\tcounter drop"
            ),
            "{rules}"
        );
    }

    #[test]
    fn routed_mark_is_accepted_in_the_forward_path_only() {
        let rules = guard(&[], &[]).with_routed(Some(0x7452)).ruleset();
        let (forward, rest) = rules.split_once("chain output").expect("chains");
        let accept = forward.find("meta mark 0x7452 accept").expect("accepted");
        assert!(
            accept < forward.find("jump protected").expect("drop"),
            "{rules}"
        );
        assert!(!rest.contains("0x7452"), "{rules}");
        assert!(!guard(&[], &[]).ruleset().contains("0x7452"));
    }

    #[test]
    fn a_family_without_prefixes_has_no_rule() {
        let set = test_set(&[("192.0.2.0/24", &["80"])]);
        let rules = Guard::new(&set, 1, 2).ruleset();
        assert!(!rules.contains("ip6 daddr"), "{rules}");
    }

    #[test]
    fn install_replaces_the_table_in_one_transaction() {
        #[derive(Default)]
        struct Recorder(std::sync::Mutex<Vec<String>>);
        impl NftRunner for Recorder {
            fn apply(&self, script: &str) -> Result<(), FirewallError> {
                self.0.lock().expect("lock").push(script.to_owned());
                Ok(())
            }
            fn list(&self, _: &str) -> Result<Option<String>, FirewallError> {
                Ok(None)
            }
        }
        let recorder = Recorder::default();
        install(&recorder, &guard(&[], &[])).expect("install");
        let scripts = recorder.0.lock().expect("lock").clone();
        assert_eq!(scripts.len(), 1, "one nft run");
        assert!(
            scripts[0].starts_with(
                "table inet tcpgate_guard {}\ndelete table inet tcpgate_guard\ntable inet tcpgate_guard {\n"
            ),
            "{}",
            scripts[0]
        );
        assert!(!remove(&recorder).expect("remove"), "was absent");
    }
}
