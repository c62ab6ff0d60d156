//! The agent's configuration: a TOML file, loaded, then validated (every bad
//! field reported at once), then CLI overrides applied. Nothing falls back
//! silently: a field is either absent (and takes its documented default) or
//! valid.

mod cluster;
mod http;
mod intercept;
mod routed;
pub mod trie;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use cluster::{ClusterSection, DEFAULT_PREFIX as DEFAULT_CLUSTER_PREFIX};
pub use http::{AdminSection, ApiSection, DEFAULT_ADMIN_SOCKET, HttpLimits};
pub use intercept::{
    DEFAULT_LISTEN_PORT, InterceptEntry, InterceptPrefix, InterceptSection, InterceptSet, Pass,
    UpstreamMap,
};
#[cfg(test)]
pub(crate) use intercept::{test_section, test_set};
pub use routed::{RoutedGrantsSection, TargetSees};
pub use validate::{FieldError, GroupError, resolve_group};

/// Exit status for configuration and usage errors (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tcpgate/tcpgate.toml";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for tcpgate: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} invalid field(s):\n{}", errors.len(), validate::render(errors))]
    Invalid {
        path: PathBuf,
        errors: Vec<FieldError>,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Agent-wide settings.
    #[serde(default)]
    pub agent: AgentSection,
    /// Where audit events go.
    #[serde(default)]
    pub audit: AuditSection,
    /// Health, metrics and operator endpoints.
    #[serde(default)]
    pub admin: Option<AdminSection>,
    /// Static listeners: a local address forwarded to a fixed upstream.
    #[serde(default, rename = "forward")]
    pub forwards: Vec<Forward>,
    /// Transparent interception of destination prefixes.
    #[serde(default)]
    pub intercept: Option<InterceptSection>,
    /// The validated form of `intercept` (filled by validation).
    #[serde(skip)]
    pub intercept_set: InterceptSet,
    /// `[auth]`, or `auth = "none"`, as written; absent is a config error,
    /// so that admitting everyone is never an accident.
    #[serde(default, rename = "auth")]
    auth_setting: Option<crate::auth::config::AuthSetting>,
    /// Token authentication, from `[auth]` (filled by validation); `None`
    /// only when the file says `auth = "none"`.
    #[serde(skip)]
    pub auth: Option<crate::auth::AuthConfig>,
    /// Policy rules, evaluated in order; deny by default.
    #[serde(default)]
    pub policy: Vec<crate::auth::RuleConfig>,
    /// The grant API runners call (`POST /v1/grants`).
    #[serde(default)]
    pub api: Option<ApiSection>,
    /// A fleet of bastions sharing grants and revocations through etcd.
    #[serde(default)]
    pub cluster: Option<ClusterSection>,
}

/// Which data path moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatapathChoice {
    /// eBPF when it loads, else the user-space copy with a warning.
    Auto,
    /// The in-kernel splice; fail to start if eBPF cannot load.
    Ebpf,
    /// The agent copies bytes itself (splice-free fallback).
    Userspace,
}

/// Where a running agent waits for its successor, by default.
pub const DEFAULT_TAKEOVER_SOCKET: &str = "/run/tcpgate/takeover.sock";

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    pub datapath: DatapathChoice,
    /// bpffs directory for the pinned maps.
    pub pin_dir: PathBuf,
    /// Most sessions live at once; also sizes the eBPF maps.
    pub max_sessions: u32,
    /// Deadline for the upstream TCP handshake.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// After one side closes, how long the other direction may go without
    /// progress before the session is aborted.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// On SIGTERM, how long live sessions may continue before being ended.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A session whose sent data stays unacknowledged this long (a stalled
    /// or vanished peer: `TCP_USER_TIMEOUT`), or whose idle peer stops
    /// answering keepalive probes, is aborted.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Send buffer forced on both spliced sockets (`SO_SNDBUFFORCE`), in
    /// bytes; 0 keeps the kernel's autotuning. The splice's backlog worker
    /// retries a jiffy later whenever the peer's send buffer is full, so a
    /// larger buffer keeps a stream moving: 8 MiB took one stream from
    /// about 3.7 to 6.8 Gbit/s here. Memory is only used while data is in
    /// flight, and the kernel's `tcp_mem` limits still apply.
    pub splice_sndbuf: u32,
    /// Bytes one direction may queue in the kernel for a peer that reads
    /// slower than the other side sends. The splice itself has no
    /// backpressure; past this limit the direction's bytes wait in the
    /// sender's socket (its TCP window closes) and the agent copies them.
    pub splice_queue_limit: u64,
    /// Bytes (both directions together) the agent copies itself before a
    /// session goes to the kernel path; 0 (the default) splices at once.
    /// Entering and leaving the kernel's splice costs more than copying a
    /// few bytes, so a short session that ends within this budget (a
    /// health check, one query) is cheaper copied: see
    /// docs/bench/notes-issue-17.md. Such a session's audit line says
    /// `"datapath":"userspace"`.
    pub splice_after_bytes: u64,
    /// `SO_MARK` on the agent's upstream sockets.
    pub upstream_mark: u32,
    /// Group (name or numeric gid) whose members may read the pinned maps
    /// (`tcpgate sessions`, `tcpgate grants`) without root: the pin
    /// directory becomes `root:<group>` mode 0750, the pinned maps 0640.
    pub operator_group: Option<String>,
    /// Leave the pinned maps in place on a clean shutdown, for post-mortem
    /// inspection; the next start reports and removes them.
    pub keep_pins: bool,
    /// The unix socket a successor (`tcpgate run --takeover`) connects to
    /// for this agent's listeners and state. Created mode 0600 in a 0700
    /// directory; only root or the agent's own user may use it.
    pub takeover_socket: PathBuf,
    /// How long each step of a takeover may wait for the other agent; an
    /// unresponsive predecessor is then given up on.
    #[serde(with = "humantime_serde")]
    pub takeover_timeout: Duration,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            datapath: DatapathChoice::Auto,
            pin_dir: PathBuf::from("/sys/fs/bpf/tcpgate"),
            max_sessions: 16384,
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(120),
            splice_sndbuf: 8 << 20,
            splice_queue_limit: 16 << 20,
            splice_after_bytes: 0,
            upstream_mark: 0x7467,
            operator_group: None,
            keep_pins: false,
            takeover_socket: PathBuf::from(DEFAULT_TAKEOVER_SOCKET),
            takeover_timeout: Duration::from_secs(30),
        }
    }
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// A file to append JSON lines to, or `-` for standard output.
    pub path: String,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            path: "-".to_owned(),
        }
    }
}

/// `[[forward]]`: connections to `listen` go to `upstream`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// A name for logs; defaults to the listen address.
    #[serde(default)]
    pub name: Option<String>,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
}

impl Forward {
    /// The name shown in logs and audit events.
    #[must_use]
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.listen.to_string())
    }
}

/// Settings given on the command line, applied after validation.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub datapath: Option<DatapathChoice>,
    pub pin_dir: Option<PathBuf>,
}

impl Config {
    /// Parses and validates `text`; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut errors = config.validate();
        config.auth = config.resolve_auth(&mut errors);
        if let Some(section) = &config.intercept {
            config.intercept_set = section.resolve(&mut errors);
        }
        errors.extend(config.validate_auth());
        if let Some(cluster) = &config.cluster {
            errors.extend(cluster.validate());
            if config.auth.is_none() {
                errors.push(FieldError::new(
                    "cluster",
                    "sharing grants needs an [auth] section (with auth = \"none\" there are no grants)",
                ));
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                errors,
            })
        }
    }

    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Applies command-line overrides (already validated by clap).
    #[must_use]
    pub fn with_overrides(mut self, overrides: &Overrides) -> Self {
        if let Some(datapath) = overrides.datapath {
            self.agent.datapath = datapath;
        }
        if let Some(pin_dir) = &overrides.pin_dir {
            self.agent.pin_dir.clone_from(pin_dir);
        }
        self
    }
}

#[cfg(test)]
mod tests;
