//! Policy routing for interception, behind a small seam.
//!
//! - Table T holds `local default dev lo` (IPv4 with `src 127.0.0.1`, IPv6
//!   with `src ::1`), so whatever is routed through it is delivered locally,
//!   where the sk_lookup program steers it to the agent's listener.
//! - Priority P: `fwmark M lookup main`: the agent's own upstream sockets
//!   carry mark M and are never intercepted again.
//! - Priority P+1: one rule per live session whose prefix a reload removed,
//!   so the session keeps flowing while new connections follow the new set.
//! - Priority P+2: `to <prefix> ipproto tcp dport <range> lookup T`, one per
//!   intercepted prefix and port range. Rules match both forwarded runner
//!   traffic and connections made on the bastion itself.
//!
//! Every rule and route carries protocol [`PROTO`], which is how a restarted
//! agent finds what a crashed one left behind.

use std::net::SocketAddr;

use ipnet::IpNet;

use crate::config::InterceptSet;
use crate::dest::PortRange;

/// Route/rule protocol number marking tcpgate's entries.
pub const PROTO: u8 = 213;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot run `ip {args}` (is iproute2 installed?)")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("cannot parse `ip {args}` output")]
    Parse {
        args: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "rule priority {priority} is already used by a rule tcpgate did not create; choose another intercept.rule_priority"
    )]
    PriorityTaken { priority: u32 },
}

/// Runs `ip` with the given arguments; the seam tests replace.
pub trait IpRunner: Send + Sync {
    fn ip(&self, args: &[String]) -> Result<String, RoutingError>;
}

/// The real iproute2.
pub struct IpCommand;

impl IpRunner for IpCommand {
    fn ip(&self, args: &[String]) -> Result<String, RoutingError> {
        let joined = args.join(" ");
        let output = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|source| RoutingError::Spawn {
                args: joined.clone(),
                source,
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(RoutingError::Failed {
                args: joined,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}

/// Where tcpgate's rules live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingParams {
    pub table: u32,
    pub priority: u32,
    pub mark: u32,
}

/// One policy rule, as tcpgate writes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub v6: bool,
    pub priority: u32,
    pub selector: Vec<String>,
    pub table: String,
}

impl Rule {
    fn args(&self, verb: &str) -> Vec<String> {
        let mut args = Vec::with_capacity(self.selector.len() + 10);
        if self.v6 {
            args.push("-6".to_owned());
        }
        args.extend(["rule", verb, "priority"].map(str::to_owned));
        args.push(self.priority.to_string());
        args.extend(self.selector.iter().cloned());
        args.extend([
            "lookup".to_owned(),
            self.table.clone(),
            "protocol".to_owned(),
            PROTO.to_string(),
        ]);
        args
    }
}

/// Where intercepted connections come from: the interfaces runners' packets
/// arrive on (forwarded traffic), and the bastion's own processes.
///
/// Rules never match on destination alone: with custom rules in place, the
/// kernel's reverse-path check of every incoming packet does a lookup with
/// `iif lo`, the packet's source as destination and its ports swapped, so a
/// bare `to <prefix> dport 80` rule would also match the upstream's replies to
/// the agent, route them to the local table and drop them as martians. Local
/// processes are told apart by their source during connect: unset
/// (`0.0.0.0`, `::`) on the first lookup, then the loopback source the local
/// route hands out.
#[must_use]
pub fn prefix_rules(set: &InterceptSet, params: RoutingParams, interfaces: &[String]) -> Vec<Rule> {
    let mut rules = Vec::new();
    for entry in &set.entries {
        let prefix = entry.destination.prefix;
        let v6 = matches!(prefix, IpNet::V6(_));
        let local_sources: [&str; 2] = if v6 {
            ["::/128", "::1/128"]
        } else {
            ["0.0.0.0/32", "127.0.0.1/32"]
        };
        let origins = interfaces
            .iter()
            .map(|ifname| ["iif".to_owned(), ifname.clone()])
            .chain(
                local_sources
                    .iter()
                    .map(|src| ["from".to_owned(), (*src).to_owned()]),
            );
        for origin in origins {
            for range in &entry.destination.ports {
                let mut selector = origin.to_vec();
                selector.extend([
                    "to".to_owned(),
                    prefix.to_string(),
                    "ipproto".to_owned(),
                    "tcp".to_owned(),
                ]);
                if *range
                    != (PortRange {
                        first: 1,
                        last: u16::MAX,
                    })
                {
                    selector.push("dport".to_owned());
                    selector.push(format!("{}-{}", range.first, range.last));
                }
                rules.push(Rule {
                    v6,
                    priority: params.priority + 2,
                    selector,
                    table: params.table.to_string(),
                });
            }
        }
    }
    rules
}

/// Every interface except loopback, for `intercept.interfaces = "all"`.
pub fn all_interfaces(runner: &dyn IpRunner) -> Result<Vec<String>, RoutingError> {
    let list = args(&["-j", "link", "show"]);
    let text = runner.ip(&list)?;
    let links: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|source| RoutingError::Parse {
            args: list.join(" "),
            source,
        })?;
    Ok(links
        .iter()
        .filter(|l| l["link_type"] != "loopback")
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect())
}

/// The rules that exempt the agent's own upstream sockets (both families).
#[must_use]
pub fn mark_rules(params: RoutingParams) -> Vec<Rule> {
    [false, true]
        .into_iter()
        .map(|v6| Rule {
            v6,
            priority: params.priority,
            selector: vec!["fwmark".to_owned(), format!("{:#x}", params.mark)],
            table: "main".to_owned(),
        })
        .collect()
}

/// A rule keeping one live session's packets local after a reload removed
/// its prefix.
#[must_use]
pub fn session_rule(client: SocketAddr, destination: SocketAddr, params: RoutingParams) -> Rule {
    let host = |addr: SocketAddr| IpNet::from(addr.ip().to_canonical()).to_string();
    Rule {
        v6: destination.ip().to_canonical().is_ipv6(),
        priority: params.priority + 1,
        selector: vec![
            "from".to_owned(),
            host(client),
            "to".to_owned(),
            host(destination),
            "ipproto".to_owned(),
            "tcp".to_owned(),
            "sport".to_owned(),
            client.port().to_string(),
            "dport".to_owned(),
            destination.port().to_string(),
        ],
        table: params.table.to_string(),
    }
}

/// Applies and removes tcpgate's routing state.
pub struct Routing {
    runner: Box<dyn IpRunner>,
    params: RoutingParams,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

impl Routing {
    pub fn new(runner: Box<dyn IpRunner>, params: RoutingParams) -> Self {
        Self { runner, params }
    }

    #[must_use]
    pub fn params(&self) -> RoutingParams {
        self.params
    }

    /// The interfaces to intercept forwarded traffic on: the configured
    /// ones, or every non-loopback interface present now.
    pub fn interfaces(&self, configured: Option<&[String]>) -> Result<Vec<String>, RoutingError> {
        match configured {
            Some(list) => Ok(list.to_vec()),
            None => all_interfaces(self.runner.as_ref()),
        }
    }

    pub fn add(&self, rule: &Rule) -> Result<(), RoutingError> {
        self.runner.ip(&rule.args("add")).map(drop)
    }

    pub fn delete(&self, rule: &Rule) -> Result<(), RoutingError> {
        self.runner.ip(&rule.args("del")).map(drop)
    }

    /// Removes every rule and route tcpgate owns; refuses to touch rules at
    /// its priorities that someone else created. Returns how many went.
    pub fn remove_all(&self) -> Result<usize, RoutingError> {
        let mut removed = 0;
        for family in ["-4", "-6"] {
            let list = args(&[family, "-j", "rule", "show"]);
            let text = self.runner.ip(&list)?;
            let rules: Vec<serde_json::Value> =
                serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text }).map_err(
                    |source| RoutingError::Parse {
                        args: list.join(" "),
                        source,
                    },
                )?;
            for rule in rules {
                let priority = rule["priority"].as_u64().unwrap_or(0) as u32;
                if !(self.params.priority..=self.params.priority + 2).contains(&priority) {
                    continue;
                }
                if rule["protocol"].as_str() != Some(&PROTO.to_string()) {
                    return Err(RoutingError::PriorityTaken { priority });
                }
                let priority = priority.to_string();
                self.runner.ip(&args(&[
                    family,
                    "rule",
                    "del",
                    "priority",
                    &priority,
                    "protocol",
                    &PROTO.to_string(),
                ]))?;
                removed += 1;
            }
            // `show table T` fails while the table does not exist; `all` never does.
            let list = args(&[family, "-j", "route", "show", "table", "all"]);
            let text = self.runner.ip(&list)?;
            let routes: Vec<serde_json::Value> =
                serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text }).map_err(
                    |source| RoutingError::Parse {
                        args: list.join(" "),
                        source,
                    },
                )?;
            let table = self.params.table.to_string();
            let ours = routes
                .iter()
                .filter(|r| {
                    r["table"].as_str() == Some(&table)
                        && r["protocol"].as_str() == Some(&PROTO.to_string())
                })
                .count();
            if ours > 0 {
                self.runner.ip(&args(&[
                    family,
                    "route",
                    "flush",
                    "table",
                    &table,
                    "proto",
                    &PROTO.to_string(),
                ]))?;
                removed += ours;
            }
        }
        Ok(removed)
    }

    /// Installs the local routes and the mark rules (not the prefix rules).
    pub fn install_base(&self) -> Result<(), RoutingError> {
        let table = self.params.table.to_string();
        let proto = PROTO.to_string();
        self.runner.ip(&args(&[
            "-4",
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table,
            "proto",
            &proto,
            "src",
            "127.0.0.1",
        ]))?;
        self.runner.ip(&args(&[
            "-6", "route", "add", "local", "::/0", "dev", "lo", "table", &table, "proto", &proto,
        ]))?;
        for rule in mark_rules(self.params) {
            self.add(&rule)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
