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
