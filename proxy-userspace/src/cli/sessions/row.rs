//! One session as `tcpgate sessions` shows it, whichever source read it.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cli::view;

/// Where a session was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    PinnedSessions,
    RoutedFlows,
    OperatorSocket,
}

/// Which path moves a session's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Datapath {
    Ebpf,
    Userspace,
    Routed,
}

/// One session in `--json` output.
#[derive(Debug, Serialize)]
pub struct SessionRow {
    pub session_id: String,
    pub grant_id: Option<String>,
    pub subject: String,
    pub client: String,
    pub destination: String,
    pub upstream: String,
    /// `none`, `preamble` or `source_grant`.
    pub auth: &'static str,
    /// `ebpf`, `userspace` or `routed`.
    pub datapath: Datapath,
    pub started_at_unix_ms: u64,
    pub expires_at_unix_ms: Option<u64>,
    pub age_seconds: f64,
    pub time_left_seconds: Option<f64>,
    /// Client to upstream, every path.
    pub bytes_up: u64,
    /// Upstream to client, every path.
    pub bytes_down: u64,
    /// Kernel-counted packets (eBPF and routed paths).
    pub packets_up: u64,
    pub packets_down: u64,
    pub redirect_failures_up: u64,
    pub redirect_failures_down: u64,
    /// Null without a second sample.
    pub rate_up_bytes_per_second: Option<f64>,
    pub rate_down_bytes_per_second: Option<f64>,
    /// A session a taken-over agent (this pid) keeps until it ends; null
    /// for the running agent's own.
    pub draining_agent_pid: Option<u32>,
    /// The sources that list it (additive to v1).
    pub listed_by: Vec<Source>,
}

impl SessionRow {
    /// A row with every other field empty.
    #[must_use]
    pub fn new(session_id: String, source: Source, datapath: Datapath) -> Self {
        Self {
            session_id,
            grant_id: None,
            subject: String::new(),
            client: String::new(),
            destination: String::new(),
            upstream: String::new(),
            auth: "none",
            datapath,
            started_at_unix_ms: 0,
            expires_at_unix_ms: None,
            age_seconds: 0.0,
            time_left_seconds: None,
            bytes_up: 0,
            bytes_down: 0,
            packets_up: 0,
            packets_down: 0,
            redirect_failures_up: 0,
            redirect_failures_down: 0,
            rate_up_bytes_per_second: None,
            rate_down_bytes_per_second: None,
            draining_agent_pid: None,
            listed_by: vec![source],
        }
    }

    pub fn set_times(&mut self, now: SystemTime, started: SystemTime, expires: Option<SystemTime>) {
        let secs = |d: Result<Duration, _>| d.unwrap_or_default().as_secs_f64();
        self.started_at_unix_ms = view::unix_ms(started);
        self.expires_at_unix_ms = expires.map(view::unix_ms);
        self.age_seconds = secs(now.duration_since(started));
        self.time_left_seconds = expires.map(|at| secs(at.duration_since(now)));
    }
}
