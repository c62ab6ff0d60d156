//! `tcpgate sessions`: every live session, whichever path it took, as a
//! table or as JSON. Three sources, merged by session id:
//!
//! - [`pinned`]: the pinned `sessions` map (and the maps of taken-over
//!   agents still draining), read without the agent;
//! - [`routed`]: the pinned `flows` map of routed grants, read without the
//!   agent;
//! - [`admin`]: the agent's operator endpoint (`GET /v1/sessions`), the only
//!   source for an agent without the eBPF programs.
//!
//! A source that does not answer is noted (stderr in table mode, `sources`
//! in JSON); only when none answers is it an error.

mod admin;
mod merge;
mod pinned;
mod routed;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::view;
use crate::pinned::{PinnedError, PinnedMaps};

/// The `schema` field of `--json` output; bumped on any incompatible change.
pub const SCHEMA: &str = "tcpgate.sessions/v1";

#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// `--admin`: the operator endpoint asked for the sessions the pinned
    /// maps do not hold (a forward-only user-space agent's); `--config`:
    /// where `[admin]` and `[agent] pin_dir` are read.
    #[command(flatten)]
    pub admin: super::AdminArg,
    /// The agent's pin directory. Default: `[agent] pin_dir` from the
    /// configuration file, else /sys/fs/bpf/tcpgate.
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// How long to wait for the operator endpoint at each reading before
    /// listing without it.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub api_timeout: Duration,
    /// Print JSON (schema `tcpgate.sessions/v1`, see docs/operating.md);
    /// with --watch, one document per line per refresh.
    #[arg(long)]
    pub json: bool,
    /// Refresh in place every INTERVAL (default 2s) until interrupted; the
    /// rate is measured between refreshes.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s",
          value_parser = humantime::parse_duration)]
    pub watch: Option<Duration>,
    /// Without --watch: read the counters twice, this far apart, to show the
    /// current rate; 0 skips the rate.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub sample: Duration,
}

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

    fn set_times(&mut self, now: SystemTime, started: SystemTime, expires: Option<SystemTime>) {
        let secs = |d: Result<Duration, _>| d.unwrap_or_default().as_secs_f64();
        self.started_at_unix_ms = view::unix_ms(started);
        self.expires_at_unix_ms = expires.map(view::unix_ms);
        self.age_seconds = secs(now.duration_since(started));
        self.time_left_seconds = expires.map(|at| secs(at.duration_since(now)));
    }
}

/// Whether a source answered at the last reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Answered,
    /// Nothing there: no pin directory, no `flows` map (routed grants off).
    Absent,
    /// There, but it could not be read, or the socket did not answer.
    Failed,
}

/// One source in `--json` output (`sources`, additive to v1).
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub source: Source,
    /// The map's pin, or the operator endpoint.
    pub location: String,
    pub status: Status,
    /// Why it is absent or failed.
    pub detail: Option<String>,
}

/// The whole `--json` document.
#[derive(Debug, Serialize)]
pub struct SessionsDoc<'a> {
    pub schema: &'static str,
    pub pin_dir: String,
    pub taken_at_unix_ms: u64,
    /// Which sources answered (additive to v1).
    pub sources: &'a [SourceReport],
    pub sessions: &'a [SessionRow],
}

/// Every source, opened once for all readings.
struct Sources {
    pin_dir: PathBuf,
    admin: admin::AdminSource,
    runtime: tokio::runtime::Runtime,
}

struct Reading {
    at: Instant,
    rows: Vec<SessionRow>,
    sources: Vec<SourceReport>,
}

impl Reading {
    /// Why nothing could be listed, when no source answered.
    fn nothing_answered(&self) -> Option<String> {
        if self.sources.iter().any(|s| s.status == Status::Answered) {
            return None;
        }
        let why: Vec<String> = self
            .sources
            .iter()
            .filter(|s| s.source != Source::RoutedFlows)
            .map(|s| {
                let detail = s.detail.as_deref().unwrap_or("no answer");
                match s.source {
                    Source::OperatorSocket => {
                        format!(
                            "the operator socket {} did not answer ({detail})",
                            s.location
                        )
                    }
                    _ => detail.to_owned(),
                }
            })
            .collect();
        Some(why.join("; and "))
    }
}

impl Sources {
    fn read(&self) -> Reading {
        let now = SystemTime::now();
        let mut rows = Vec::new();
        let mut sources = Vec::new();
        let report = |source, location: String, result: Result<_, _>| match result {
            Ok(Some(found)) => (
                Some(found),
                SourceReport::new(source, location, Status::Answered, None),
            ),
            Ok(None) => (
                None,
                SourceReport::new(source, location, Status::Absent, None),
            ),
            Err((status, detail)) => (
                None,
                SourceReport::new(source, location, status, Some(detail)),
            ),
        };
        let pinned_at = self.pin_dir.join("sessions").display().to_string();
        let routed_at = self
            .pin_dir
            .join(crate::pinned::FLOWS_PIN)
            .display()
            .to_string();
        let (pinned, routed) = match PinnedMaps::open(&self.pin_dir) {
            Ok(maps) => (
                pinned::read(&maps, now).map(Some).map_err(failed),
                routed::read(&maps, now).map_err(failed),
            ),
            Err(e) => {
                let why = failed(e);
                (Err(why.clone()), Err(why))
            }
        };
        for (source, location, result) in [
            (Source::PinnedSessions, pinned_at, pinned),
            (Source::RoutedFlows, routed_at, routed),
        ] {
            let (found, report) = report(source, location, result);
            rows.extend(found);
            sources.push(report);
        }
        let answer = self.runtime.block_on(self.admin.read(now));
        let (found, report) = report(
            Source::OperatorSocket,
            self.admin.endpoint.to_string(),
            answer.map(Some).map_err(|why| (Status::Failed, why)),
        );
        rows.extend(found);
        sources.push(report);
        Reading {
            at: Instant::now(),
            rows: merge::merge(rows),
            sources,
        }
    }
}

/// A pinned source's error: absent when there is no pin directory or no
/// such map in it (an agent without the eBPF programs pins nothing).
fn failed(e: PinnedError) -> (Status, String) {
    let status = match e {
        PinnedError::NoPinDir { .. } | PinnedError::NoMap { .. } => Status::Absent,
        _ => Status::Failed,
    };
    (status, crate::error_chain(&e))
}

impl SourceReport {
    fn new(source: Source, location: String, status: Status, detail: Option<String>) -> Self {
        Self {
            source,
            location,
            status,
            detail,
        }
    }
}

fn render_table(rows: &[SessionRow]) -> String {
    let mut table = view::table(&[
        "CLIENT",
        "DESTINATION",
        "SUBJECT",
        "GRANT",
        "PATH",
        "AGE",
        "LEFT",
        "UP",
        "DOWN",
        "RATE UP",
        "RATE DOWN",
    ]);
    let secs = |s: f64| view::duration(Duration::from_secs_f64(s.max(0.0)));
    let or_dash = |text: Option<String>| text.unwrap_or_else(|| "-".to_owned());
    for r in rows {
        table.add_row(vec![
            r.client.clone(),
            r.destination.clone(),
            or_dash((!r.subject.is_empty()).then(|| r.subject.clone())),
            or_dash(r.grant_id.clone()),
            match r.datapath {
                Datapath::Ebpf => "ebpf",
                Datapath::Userspace => "userspace",
                Datapath::Routed => "routed",
            }
            .to_owned(),
            secs(r.age_seconds),
            or_dash(r.time_left_seconds.map(secs)),
            view::bytes(r.bytes_up),
            view::bytes(r.bytes_down),
            or_dash(r.rate_up_bytes_per_second.map(view::rate)),
            or_dash(r.rate_down_bytes_per_second.map(view::rate)),
        ]);
    }
    let draining = rows
        .iter()
        .filter(|r| r.draining_agent_pid.is_some())
        .count();
    if draining > 0 {
        return format!(
            "{table}\n{} live session(s), {draining} of them draining in a taken-over agent",
            rows.len()
        );
    }
    format!("{table}\n{} live session(s)", rows.len())
}

/// Table mode: a note on stderr for each source that failed (an operator
/// socket that does not answer, a map that cannot be read), once per
/// change under `--watch`.
fn note_failures(reading: &Reading, noted: &mut Vec<String>) {
    let failures: Vec<String> = reading
        .sources
        .iter()
        .filter(|s| s.status == Status::Failed)
        .map(|s| {
            let detail = s.detail.as_deref().unwrap_or("no answer");
            match s.source {
                Source::OperatorSocket => format!(
                    "tcpgate sessions: note: the operator socket {} did not answer ({detail}); listing what the pinned maps hold",
                    s.location
                ),
                _ => format!("tcpgate sessions: note: not listed: {detail}"),
            }
        })
        .collect();
    if failures != *noted {
        failures.iter().for_each(|line| eprintln!("{line}"));
        *noted = failures;
    }
}

fn print(args: &SessionsArgs, dir: &std::path::Path, reading: &Reading, watching: bool) {
    if args.json {
        let doc = SessionsDoc {
            schema: SCHEMA,
            pin_dir: dir.display().to_string(),
            taken_at_unix_ms: view::unix_ms(SystemTime::now()),
            sources: &reading.sources,
            sessions: &reading.rows,
        };
        let text = if watching {
            serde_json::to_string(&doc)
        } else {
            serde_json::to_string_pretty(&doc)
        };
        match text {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("tcpgate sessions: cannot encode JSON: {e}"),
        }
    } else {
        if watching {
            view::clear_screen();
        }
        println!("{}", render_table(&reading.rows));
    }
}

/// Reads once, with rates against `before`; an error when no source
/// answered.
fn next(sources: &Sources, before: Option<&Reading>) -> Result<Reading, String> {
    let mut reading = sources.read();
    if let Some(why) = reading.nothing_answered() {
        return Err(why);
    }
    let earlier = before.map(|b| (b.rows.as_slice(), b.at));
    merge::set_rates(&mut reading.rows, earlier, reading.at);
    Ok(reading)
}

pub fn run(args: &SessionsArgs) -> i32 {
    let endpoint = match args.admin.endpoint() {
        Ok(endpoint) => endpoint,
        Err(e) => {
            eprintln!("tcpgate sessions: {}", crate::error_chain(&e));
            return crate::config::EXIT_CONFIG;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tcpgate: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let sources = Sources {
        pin_dir: view::pin_dir(args.pin_dir.as_deref(), &args.admin.config, "sessions"),
        admin: admin::AdminSource::new(endpoint, args.api_timeout),
        runtime,
    };
    match watch_or_sample(args, &sources) {
        Ok(()) => 0,
        Err(why) => {
            eprintln!("tcpgate sessions: {why}");
            1
        }
    }
}

fn watch_or_sample(args: &SessionsArgs, sources: &Sources) -> Result<(), String> {
    let dir = sources.pin_dir.as_path();
    let mut noted = Vec::new();
    let mut shown = |reading: &Reading, watching: bool| {
        if !args.json {
            note_failures(reading, &mut noted);
        }
        print(args, dir, reading, watching);
    };
    let first = next(sources, None)?;
    match args.watch {
        Some(interval) => {
            shown(&first, true);
            let mut before = first;
            loop {
                std::thread::sleep(interval);
                let now = next(sources, Some(&before))?;
                shown(&now, true);
                before = now;
            }
        }
        None if args.sample.is_zero() => {
            shown(&first, false);
            Ok(())
        }
        None => {
            std::thread::sleep(args.sample);
            shown(&next(sources, Some(&first))?, false);
            Ok(())
        }
    }
}
