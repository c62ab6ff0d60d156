//! `[intercept.routed_grants]`: the opt-in path that forwards a granted
//! source's flows as plain routing does (see `docs/routed.md`).

use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

/// Default mark of routed packets ("tR").
pub const DEFAULT_ROUTED_MARK: u32 = 0x7452;
/// Default bound of the pinned `FLOWS` map.
pub const DEFAULT_MAX_FLOWS: u32 = 4096;
/// Largest `max_flows` accepted.
pub const MAX_MAX_FLOWS: u32 = 1 << 20;

/// `[intercept.routed_grants]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutedGrantsSection {
    /// Off unless set: the intercepting path stays the default.
    #[serde(default)]
    pub enabled: bool,
    /// Firewall mark the tc program puts on routed packets.
    #[serde(default = "default_mark")]
    pub mark: u32,
    /// Flows the kernel tracks at once; a granted SYN beyond it takes the
    /// intercepting path.
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// How long a closed, refused or ended flow stays in `FLOWS` (its last
    /// ACKs still pass) before the agent removes it and writes its audit line.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
    /// How often the agent takes in the programs' flow events and syncs
    /// the routed sources (it reads `FLOWS` whole at most once a second).
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Whose address the target sees as the flow's source.
    #[serde(default)]
    pub target_sees: TargetSees,
}

/// `intercept.routed_grants.target_sees`: the source address a routed
/// flow reaches its target with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetSees {
    /// The runner's own address, untouched: the target's replies must be
    /// routed back through the bastion.
    #[default]
    Runner,
    /// The bastion's address on the target-facing interface (source NAT
    /// by the kernel's connection tracking): no return route needed.
    Bastion,
}

const fn default_mark() -> u32 {
    DEFAULT_ROUTED_MARK
}
const fn default_max_flows() -> u32 {
    DEFAULT_MAX_FLOWS
}
const fn default_linger() -> Duration {
    Duration::from_secs(2)
}
const fn default_poll() -> Duration {
    Duration::from_millis(100)
}

impl RoutedGrantsSection {
    /// Checks every field; `other_marks` are `intercept.mark` and
    /// `agent.upstream_mark`, `interfaces` whether `intercept.interfaces` is set.
    pub fn check(&self, other_marks: [u32; 2], interfaces: bool, errors: &mut Vec<FieldError>) {
        if !self.enabled {
            return;
        }
        let field = |name: &str| format!("intercept.routed_grants.{name}");
        if self.mark == 0 || other_marks.contains(&self.mark) {
            errors.push(FieldError::new(
                field("mark"),
                "must be non-zero and differ from intercept.mark and agent.upstream_mark",
            ));
        }
        if !(1..=MAX_MAX_FLOWS).contains(&self.max_flows) {
            errors.push(FieldError::new(
                field("max_flows"),
                format!("must be between 1 and {MAX_MAX_FLOWS}"),
            ));
        }
        if self.linger > Duration::from_secs(600) {
            errors.push(FieldError::new(field("linger"), "must be at most 10m"));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&self.poll_interval) {
            errors.push(FieldError::new(
                field("poll_interval"),
                "must be between 10ms and 10s",
            ));
        }
        if !interfaces {
            errors.push(FieldError::new(
                field("enabled"),
                "needs intercept.interfaces: the tc programs attach to the runner-facing interfaces",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> RoutedGrantsSection {
        toml::from_str(toml_text).expect("parses")
    }

    fn fields(s: &RoutedGrantsSection, interfaces: bool) -> Vec<String> {
        let mut errors = Vec::new();
        s.check([0x7447, 0x7467], interfaces, &mut errors);
        errors.iter().map(|e| e.path.clone()).collect()
    }

    #[test]
    fn defaults_are_valid_and_off() {
        let s = section("");
        assert!(!s.enabled);
        assert!(fields(&RoutedGrantsSection { enabled: true, ..s }, true).is_empty());
    }

    #[test]
    fn each_bad_value_names_its_field() {
        let s = section(
            "enabled = true\nmark = 0x7447\nmax_flows = 0\nlinger = \"1h\"\npoll_interval = \"1ms\"",
        );
        assert_eq!(
            fields(&s, false),
            [
                "intercept.routed_grants.mark",
                "intercept.routed_grants.max_flows",
                "intercept.routed_grants.linger",
                "intercept.routed_grants.poll_interval",
                "intercept.routed_grants.enabled",
            ]
        );
    }

    #[test]
    fn disabled_checks_nothing() {
        let s = section("mark = 0");
        assert!(fields(&s, false).is_empty());
    }

    #[test]
    fn target_sees_the_runner_unless_told_otherwise() {
        assert_eq!(section("").target_sees, TargetSees::Runner);
        assert_eq!(
            section("target_sees = \"bastion\"").target_sees,
            TargetSees::Bastion
        );
        let err = toml::from_str::<RoutedGrantsSection>("target_sees = \"nobody\"")
            .expect_err("not a choice");
        assert!(err.to_string().contains("target_sees"), "{err}");
    }
}
