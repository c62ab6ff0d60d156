//! Semantic checks that serde cannot express. Every problem is collected,
//! so an operator fixes a file in one pass.

use std::collections::HashSet;
use std::time::Duration;

use ipnet::IpNet;

use super::Config;
use crate::auth::AuthConfig;
use crate::auth::config::AuthSetting;
use crate::dest::{Destination, PortRange};

pub use crate::field_error::FieldError;

pub(super) fn render(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Destinations the agent can be asked for: the intercepted set and the
    /// static forwards' listen addresses.
    #[must_use]
    pub fn reachable_destinations(&self) -> Vec<Destination> {
        let mut all = self.intercept_set.destinations();
        for forward in &self.forwards {
            let port = forward.listen.port();
            all.push(Destination {
                prefix: IpNet::from(forward.listen.ip().to_canonical()),
                ports: vec![PortRange {
                    first: port,
                    last: port,
                }],
            });
        }
        all
    }

    /// The `[auth]` table, `None` for `auth = "none"`; a file that says
    /// neither is an error.
    pub(super) fn resolve_auth(&self, errors: &mut Vec<FieldError>) -> Option<AuthConfig> {
        match &self.auth_setting {
            Some(AuthSetting::Tokens(auth)) => Some((**auth).clone()),
            Some(AuthSetting::None) => None,
            None => {
                errors.push(FieldError::new(
                    "auth",
                    "missing: configure [auth] with at least one [[auth.issuer]], or write \
                     `auth = \"none\"` at the top of the file to admit every connection \
                     without a token (development only)",
                ));
                None
            }
        }
    }

    /// `[auth]`, `[[policy]]` and `[api]`, checked together.
    pub(super) fn validate_auth(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let Some(auth) = &self.auth else {
            if !self.policy.is_empty() {
                errors.push(FieldError::new(
                    "policy",
                    "policy rules need an [auth] section with at least one issuer",
                ));
            }
            if self.api.is_some() {
                errors.push(FieldError::new(
                    "api",
                    "the grant API needs an [auth] section",
                ));
            }
            return errors;
        };
        errors.extend(crate::auth::validate_all(auth, &self.policy));
        if errors.is_empty() {
            match crate::auth::Policy::from_config(&self.policy, auth) {
                Ok(policy) => errors.extend(policy.check_within(&self.reachable_destinations())),
                Err(policy_errors) => errors.extend(policy_errors),
            }
        }
        errors
    }

    /// Every semantic problem in the file.
    #[must_use]
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let agent = &self.agent;
        if agent.max_sessions == 0 || agent.max_sessions > 1 << 20 {
            errors.push(FieldError::new(
                "agent.max_sessions",
                "must be between 1 and 1048576",
            ));
        }
        for (name, value) in [
            ("agent.connect_timeout", agent.connect_timeout),
            ("agent.drain_timeout", agent.drain_timeout),
            ("agent.stall_timeout", agent.stall_timeout),
        ] {
            if value.is_zero() {
                errors.push(FieldError::new(name, "must be greater than zero"));
            }
        }
        if agent.splice_sndbuf != 0 && !(64 << 10..=64 << 20).contains(&agent.splice_sndbuf) {
            errors.push(FieldError::new(
                "agent.splice_sndbuf",
                "must be 0 (kernel autotuning) or between 65536 and 67108864 bytes",
            ));
        }
        if !(64 << 10..=1 << 30).contains(&agent.splice_queue_limit) {
            errors.push(FieldError::new(
                "agent.splice_queue_limit",
                "must be between 65536 and 1073741824 bytes",
            ));
        }
        if agent.splice_after_bytes > 1 << 30 {
            errors.push(FieldError::new(
                "agent.splice_after_bytes",
                "must be at most 1073741824 bytes (0 splices at once)",
            ));
        }
        if !agent.pin_dir.is_absolute() {
            errors.push(FieldError::new("agent.pin_dir", "must be an absolute path"));
        }
        if !agent.takeover_socket.is_absolute() {
            errors.push(FieldError::new(
                "agent.takeover_socket",
                "must be an absolute path",
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(600))
            .contains(&agent.takeover_timeout)
        {
            errors.push(FieldError::new(
                "agent.takeover_timeout",
                "must be between 100ms and 10m",
            ));
        }
        if agent.upstream_mark == 0 {
            errors.push(FieldError::new(
                "agent.upstream_mark",
                "must be non-zero: it tells the agent's own upstream packets apart",
            ));
        }
        if let Some(intercept) = &self.intercept
            && intercept.mark == agent.upstream_mark
        {
            errors.push(FieldError::new(
                "intercept.mark",
                "must differ from agent.upstream_mark: the agent's own upstream packets are never intercepted",
            ));
        }
        if let Some(intercept) = &self.intercept
            && let Some(routed) = &intercept.routed_grants
        {
            routed.check(
                [intercept.mark, agent.upstream_mark],
                intercept.interfaces.is_some(),
                &mut errors,
            );
        }
        if let Some(group) = &agent.operator_group
            && let Err(e) = resolve_group(group)
        {
            errors.push(FieldError::new(
                "agent.operator_group",
                crate::error_chain(&e),
            ));
        }
        if self.audit.path.is_empty() {
            errors.push(FieldError::new(
                "audit.path",
                "must be a file path or \"-\" for stdout",
            ));
        }
        let mut listens = HashSet::new();
        for (i, forward) in self.forwards.iter().enumerate() {
            let path = format!("forward[{i}]");
            if forward.listen.port() == 0 {
                errors.push(FieldError::new(format!("{path}.listen"), "needs a port"));
            }
            if !listens.insert(forward.listen) {
                errors.push(FieldError::new(
                    format!("{path}.listen"),
                    format!("{} is already used by another forward", forward.listen),
                ));
            }
            if forward.upstream.port() == 0 || forward.upstream.ip().is_unspecified() {
                errors.push(FieldError::new(
                    format!("{path}.upstream"),
                    "must be a concrete address and port",
                ));
            }
            if forward.name.as_deref() == Some("") {
                errors.push(FieldError::new(format!("{path}.name"), "must not be empty"));
            }
        }
        if let Some(api) = &self.api {
            api.check(&mut errors);
            if api
                .listen
                .iter()
                .any(|addr| self.forwards.iter().any(|f| f.listen == *addr))
            {
                errors.push(FieldError::new(
                    "api.listen",
                    "collides with a forward listener",
                ));
            }
        }
        if let Some(admin) = &self.admin {
            admin.check(&mut errors);
            if admin.listen.is_some_and(|addr| listens.contains(&addr)) {
                errors.push(FieldError::new(
                    "admin.listen",
                    "collides with a forward listener",
                ));
            }
        }
        let intercepts = self.intercept.as_ref().map_or(0, |i| i.prefixes.len());
        if self.forwards.is_empty() && intercepts == 0 {
            errors.push(FieldError::new(
                "forward",
                "nothing to serve: configure at least one [[forward]] or [[intercept.prefix]]",
            ));
        }
        errors
    }
}

/// Why `agent.operator_group` names no usable group.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("must be a group name or a numeric gid")]
    Empty,
    #[error("no group {0:?} on this host (create it with `groupadd --system {0}`)")]
    Unknown(String),
    #[error("cannot look up group {group:?}")]
    Lookup {
        group: String,
        #[source]
        source: nix::errno::Errno,
    },
}

/// The gid of `agent.operator_group`: a group name known to this host, or a
/// numeric gid.
pub fn resolve_group(group: &str) -> Result<nix::unistd::Gid, GroupError> {
    if group.is_empty() {
        return Err(GroupError::Empty);
    }
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(gid));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(found)) => Ok(found.gid),
        Ok(None) => Err(GroupError::Unknown(group.to_owned())),
        Err(source) => Err(GroupError::Lookup {
            group: group.to_owned(),
            source,
        }),
    }
}
