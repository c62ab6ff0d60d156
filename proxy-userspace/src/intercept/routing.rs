//! Policy routing for interception, behind a small seam.
//!
//! - Table T holds `local default dev lo` (IPv4 with `src 127.0.0.1`, IPv6
//!   with `src ::1`), so whatever is routed through it is delivered locally,
//!   where the sk_lookup program steers it to the agent's listener.
//! - Priority P: `fwmark U lookup main`: the agent's own upstream sockets
//!   carry mark U (`agent.upstream_mark`) and are never intercepted again.
//! - Priority P+1: unused (it held per-session rules; a restarted agent
//!   still removes any left there).
//! - Priority P+2: `fwmark I lookup T`: packets the intercept table
//!   (`marking`) marked with I (`intercept.mark`), forwarded or local alike.
//!   The rules never select by interface or source address, so nothing
//!   depends on which interfaces or addresses existed at start.
//!
//! Every rule and route carries protocol [`PROTO`], which is how a restarted
//! agent finds what a crashed one left behind.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoutingParams {
    pub table: u32,
    pub priority: u32,
    /// `agent.upstream_mark`.
    pub mark: u32,
    /// `intercept.mark`.
    pub intercept_mark: u32,
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

/// The rules that deliver marked packets locally (both families).
///
/// Only the mark selects: the kernel's reverse-path lookup of each
/// incoming packet runs with `iif lo`, the packet's source as destination
/// and its ports swapped, but with mark 0 (`src_valid_mark` off), so the
/// upstream's replies to the agent never match.
#[must_use]
pub fn intercept_rules(params: RoutingParams) -> Vec<Rule> {
    [false, true]
        .into_iter()
        .map(|v6| Rule {
            v6,
            priority: params.priority + 2,
            selector: vec!["fwmark".to_owned(), format!("{:#x}", params.intercept_mark)],
            table: params.table.to_string(),
        })
        .collect()
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

    /// Installs the local routes, the upstream mark rules and the
    /// intercept mark rules.
    pub fn install(&self) -> Result<(), RoutingError> {
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
        for rule in mark_rules(self.params)
            .into_iter()
            .chain(intercept_rules(self.params))
        {
            self.add(&rule)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
