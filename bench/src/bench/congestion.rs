//! The TCP congestion control in the bench's namespaces.
//!
//! A new network namespace takes the machine's default algorithm, so the
//! same bench measured different things on machines configured differently.
//! BBR without the `fq` qdisc paces in the kernel with a timer per burst; on
//! these 2-vCPU machines that made every bulk figure bimodal (direct with
//! eight streams at 18 or 47 Gbit/s from one run to the next, see
//! docs/bench/notes-issue-17.md) and tripled CPU per GiB against cubic, the
//! kernel's own default. The bench sets one algorithm in every namespace it
//! makes and records it beside the machine's default.
//!
//! A namespace other than the machine's own may only take an algorithm in
//! `net.ipv4.tcp_allowed_congestion_control` (the kernel answers `EPERM`
//! otherwise; the machine's default is always in that list). Where the
//! chosen one is not, [`CongestionControl::allow`] adds it for the run and
//! puts the list back when its guard drops.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context as _, Result};
use serde::Serialize;
use tcpgate_tests::Topology;

use super::machine::read_trimmed;

/// A congestion-control algorithm's name, as
/// `net.ipv4.tcp_congestion_control` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CongestionControl(String);

/// `TCP_CA_NAME_MAX` is 16 bytes with the terminating NUL.
const NAME_MAX: usize = 15;

/// The algorithms a namespace other than the machine's may take.
const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("a congestion control name is 1 to {NAME_MAX} characters, not {0}")]
    Length(usize),
    #[error("a congestion control name has only a-z, 0-9 and '_' (like cubic or bbr), not {0:?}")]
    Characters(String),
}

impl FromStr for CongestionControl {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, NameError> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(NameError::Length(name.len()));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(NameError::Characters(name.to_owned()));
        }
        Ok(CongestionControl(name.to_owned()))
    }
}

impl fmt::Display for CongestionControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl CongestionControl {
    /// Sets this algorithm in the runner, bastion and target namespaces
    /// (the kernel loads its module if it must).
    pub fn pin(&self, topo: &Topology) -> Result<()> {
        for ns in [&topo.runner, &topo.bastion, &topo.target] {
            ns.sysctl("net.ipv4.tcp_congestion_control", &self.0)
                .with_context(|| {
                    format!(
                        "--congestion-control {self}: the kernel refused it in namespace {} \
                         (available here: {})",
                        ns.name(),
                        available()
                    )
                })?;
        }
        Ok(())
    }

    /// Makes sure namespaces may take this algorithm: when the machine's
    /// allowed list lacks it, adds it until the returned guard drops.
    pub fn allow(&self) -> Result<Option<AllowedGuard>> {
        let read =
            std::fs::read_to_string(ALLOWED).with_context(|| format!("reading {ALLOWED}"))?;
        let before = read.trim();
        let Some(extended) = with_name(before, &self.0) else {
            return Ok(None);
        };
        std::fs::write(ALLOWED, &extended).with_context(|| {
            format!(
                "--congestion-control {self}: adding it to {ALLOWED} (available here: {})",
                available()
            )
        })?;
        println!(
            "bench: added {self} to net.ipv4.tcp_allowed_congestion_control for this run, \
             so the bench's namespaces may take it (put back to {before:?} at the end)"
        );
        Ok(Some(AllowedGuard {
            before: before.to_owned(),
        }))
    }
}

/// The allowed list as it was before [`CongestionControl::allow`] added
/// to it; written back on drop.
#[derive(Debug)]
pub struct AllowedGuard {
    before: String,
}

impl Drop for AllowedGuard {
    fn drop(&mut self) {
        if let Err(err) = std::fs::write(ALLOWED, &self.before) {
            eprintln!(
                "bench: could not put {ALLOWED} back to {:?}: {err}",
                self.before
            );
        }
    }
}

/// The allowed list with `name` added, or `None` when it is already there.
fn with_name(list: &str, name: &str) -> Option<String> {
    if list.split_whitespace().any(|allowed| allowed == name) {
        return None;
    }
    Some(if list.is_empty() {
        name.to_owned()
    } else {
        format!("{list} {name}")
    })
}

/// The machine's default algorithm, which new namespaces would take.
pub fn machine_default() -> String {
    read_trimmed("/proc/sys/net/ipv4/tcp_congestion_control")
}

fn available() -> String {
    read_trimmed("/proc/sys/net/ipv4/tcp_available_congestion_control")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_takes() {
        for name in ["cubic", "bbr", "reno", "dctcp", "highspeed", "bbr_2"] {
            let cc: CongestionControl = name.parse().expect(name);
            assert_eq!(cc.to_string(), name);
        }
    }

    #[test]
    fn an_algorithm_missing_from_the_allowed_list_is_added() {
        assert_eq!(
            with_name("reno bbr", "cubic").as_deref(),
            Some("reno bbr cubic")
        );
        assert_eq!(with_name("", "cubic").as_deref(), Some("cubic"));
        assert_eq!(with_name("reno cubic bbr", "cubic"), None);
        assert_eq!(with_name("reno bbr", "bbr"), None);
        // A name is matched whole, not as a part of another.
        assert_eq!(with_name("bbr_2", "bbr").as_deref(), Some("bbr_2 bbr"));
    }

    /// Whatever the machine allows, the bench's namespaces take cubic, and
    /// the machine's allowed list is as it was afterwards (this test once
    /// would have failed on machines allowing only `reno bbr`: `EPERM`).
    #[test]
    fn namespaces_take_the_algorithm_and_the_allowed_list_is_put_back() {
        if !tcpgate_tests::require_root() {
            return;
        }
        let before = read_trimmed(ALLOWED);
        let cubic: CongestionControl = "cubic".parse().expect("valid");
        let topo = Topology::new().expect("namespaces");
        {
            let guard = cubic.allow().expect("allowed");
            let listed = before.split_whitespace().any(|name| name == "cubic");
            assert_eq!(guard.is_some(), !listed, "allowed list was {before:?}");
            assert!(
                read_trimmed(ALLOWED)
                    .split_whitespace()
                    .any(|name| name == "cubic"),
                "{}",
                read_trimmed(ALLOWED)
            );
            cubic.pin(&topo).expect("pinned");
        }
        assert_eq!(read_trimmed(ALLOWED), before);
        for ns in [&topo.runner, &topo.bastion, &topo.target] {
            let set = ns
                .exec_ok(&["sysctl", "-n", "net.ipv4.tcp_congestion_control"])
                .expect("sysctl");
            assert_eq!(set.trim(), "cubic", "namespace {}", ns.name());
        }
    }

    #[test]
    fn malformed_names_say_why() {
        assert_eq!("".parse::<CongestionControl>(), Err(NameError::Length(0)));
        assert_eq!(
            "a_very_long_name_".parse::<CongestionControl>(),
            Err(NameError::Length(17))
        );
        let err = "cubic reno"
            .parse::<CongestionControl>()
            .expect_err("a space");
        assert_eq!(err, NameError::Characters("cubic reno".into()));
        assert!(err.to_string().contains("like cubic or bbr"), "{err}");
        assert!("BBR".parse::<CongestionControl>().is_err());
        assert!("../x".parse::<CongestionControl>().is_err());
    }
}
