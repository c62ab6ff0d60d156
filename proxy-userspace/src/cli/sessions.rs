//! `tcpgate sessions`: live sessions, read from the pinned `sessions` map
//! (no call to the agent), as a table or as JSON.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use proxy_common::addr::read_str;
use proxy_common::session::{AUTH_PREAMBLE, AUTH_SOURCE_GRANT, DATAPATH_USERSPACE, SessionRecord};
use serde::Serialize;

use super::view;
use crate::pinned::PinnedMaps;

/// The `schema` field of `--json` output; bumped on any incompatible change.
pub const SCHEMA: &str = "tcpgate.sessions/v1";

#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// The agent's pin directory. Default: `[agent] pin_dir` from the
    /// configuration file, else /sys/fs/bpf/tcpgate.
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
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
    /// `ebpf` or `userspace`.
    pub datapath: &'static str,
    pub started_at_unix_ms: u64,
    pub expires_at_unix_ms: Option<u64>,
    pub age_seconds: f64,
    pub time_left_seconds: Option<f64>,
    /// Client to upstream, every path.
    pub bytes_up: u64,
    /// Upstream to client, every path.
    pub bytes_down: u64,
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
}

/// The whole `--json` document.
#[derive(Debug, Serialize)]
pub struct SessionsDoc {
    pub schema: &'static str,
    pub pin_dir: String,
    pub taken_at_unix_ms: u64,
    pub sessions: Vec<SessionRow>,
}

struct Reading {
    at: Instant,
    /// Each with the pid of the taken-over agent draining it, if any.
    records: Vec<(Option<u32>, SessionRecord)>,
}

/// The agent's sessions, and those agents it took over still drain
/// (pinned under `draining-<pid>/`; one that just ended is skipped).
fn read(maps: &PinnedMaps) -> Result<Reading, crate::pinned::PinnedError> {
    let mut records: Vec<_> = maps.sessions()?.into_iter().map(|r| (None, r)).collect();
    for (pid, dir) in crate::drain_pins::list(maps.dir()) {
        if let Ok(sessions) = PinnedMaps::open(&dir).and_then(|m| m.sessions()) {
            records.extend(sessions.into_iter().map(|r| (Some(pid), r)));
        }
    }
    Ok(Reading {
        at: Instant::now(),
        records,
    })
}

fn auth_name(method: u16) -> &'static str {
    match method {
        AUTH_PREAMBLE => "preamble",
        AUTH_SOURCE_GRANT => "source_grant",
        _ => "none",
    }
}

fn row(
    (draining, record): &(Option<u32>, SessionRecord),
    now: SystemTime,
    rates: Option<(f64, f64)>,
) -> SessionRow {
    let started = view::unix_ns(record.started_unix_ns).unwrap_or(now);
    let expires = view::unix_ns(record.expires_unix_ns);
    SessionRow {
        session_id: format!("{:016x}", record.session_id),
        grant_id: (record.grant_id != 0).then(|| format!("{:016x}", record.grant_id)),
        subject: read_str(&record.subject).to_owned(),
        client: view::socket_addr(record.client_addr, record.client_port).to_string(),
        destination: view::socket_addr(record.dest_addr, record.dest_port).to_string(),
        upstream: view::socket_addr(record.upstream_addr, record.upstream_port).to_string(),
        auth: auth_name(record.auth_method),
        datapath: if record.datapath == DATAPATH_USERSPACE {
            "userspace"
        } else {
            "ebpf"
        },
        started_at_unix_ms: view::unix_ms(started),
        expires_at_unix_ms: expires.map(view::unix_ms),
        age_seconds: now
            .duration_since(started)
            .unwrap_or_default()
            .as_secs_f64(),
        time_left_seconds: expires
            .map(|at| at.duration_since(now).unwrap_or_default().as_secs_f64()),
        bytes_up: record.up.live_bytes(),
        bytes_down: record.down.live_bytes(),
        packets_up: record.up.kernel_packets,
        packets_down: record.down.kernel_packets,
        redirect_failures_up: record.up.redirect_failures,
        redirect_failures_down: record.down.redirect_failures,
        rate_up_bytes_per_second: rates.map(|r| r.0),
        rate_down_bytes_per_second: rates.map(|r| r.1),
        draining_agent_pid: *draining,
    }
}

/// Rows of `now`, with rates against `before` for sessions in both.
fn rows(now: &Reading, before: Option<&Reading>) -> Vec<SessionRow> {
    let earlier: HashMap<(Option<u32>, u64), &SessionRecord> = before
        .map(|b| {
            b.records
                .iter()
                .map(|(pid, r)| ((*pid, r.session_id), r))
                .collect()
        })
        .unwrap_or_default();
    let elapsed = before.map(|b| now.at.duration_since(b.at).as_secs_f64());
    let wall = SystemTime::now();
    let mut out: Vec<SessionRow> = now
        .records
        .iter()
        .map(|entry| {
            let record = &entry.1;
            let rates = match (earlier.get(&(entry.0, record.session_id)), elapsed) {
                (Some(old), Some(secs)) if secs > 0.0 => {
                    #[allow(clippy::cast_precision_loss, reason = "a rate")]
                    let per_second = |new: u64, old: u64| new.saturating_sub(old) as f64 / secs;
                    Some((
                        per_second(record.up.live_bytes(), old.up.live_bytes()),
                        per_second(record.down.live_bytes(), old.down.live_bytes()),
                    ))
                }
                _ => None,
            };
            row(entry, wall, rates)
        })
        .collect();
    out.sort_by(|a, b| {
        (a.started_at_unix_ms, &a.session_id).cmp(&(b.started_at_unix_ms, &b.session_id))
    });
    out
}

fn render_table(rows: &[SessionRow]) -> String {
    let mut table = view::table(&[
        "CLIENT",
        "DESTINATION",
        "SUBJECT",
        "GRANT",
        "AGE",
        "LEFT",
        "UP",
        "DOWN",
        "RATE UP",
        "RATE DOWN",
    ]);
    let secs = |s: f64| view::duration(Duration::from_secs_f64(s.max(0.0)));
    for r in rows {
        table.add_row(vec![
            r.client.clone(),
            r.destination.clone(),
            if r.subject.is_empty() {
                "-".to_owned()
            } else {
                r.subject.clone()
            },
            r.grant_id.clone().unwrap_or_else(|| "-".to_owned()),
            secs(r.age_seconds),
            r.time_left_seconds.map_or_else(|| "-".to_owned(), secs),
            view::bytes(r.bytes_up),
            view::bytes(r.bytes_down),
            r.rate_up_bytes_per_second
                .map_or_else(|| "-".to_owned(), view::rate),
            r.rate_down_bytes_per_second
                .map_or_else(|| "-".to_owned(), view::rate),
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

fn print(args: &SessionsArgs, maps: &PinnedMaps, rows: Vec<SessionRow>, watching: bool) {
    if args.json {
        let doc = SessionsDoc {
            schema: SCHEMA,
            pin_dir: maps.dir().display().to_string(),
            taken_at_unix_ms: view::unix_ms(SystemTime::now()),
            sessions: rows,
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
        println!("{}", render_table(&rows));
    }
}

pub fn run(args: &SessionsArgs) -> i32 {
    let dir = view::pin_dir(args.pin_dir.as_deref(), &args.config.config, "sessions");
    let result = PinnedMaps::open(&dir).and_then(|maps| {
        let mut before = read(&maps)?;
        match args.watch {
            Some(interval) => {
                print(args, &maps, rows(&before, None), true);
                loop {
                    std::thread::sleep(interval);
                    let now = read(&maps)?;
                    print(args, &maps, rows(&now, Some(&before)), true);
                    before = now;
                }
            }
            None if args.sample.is_zero() => {
                print(args, &maps, rows(&before, None), false);
                Ok(())
            }
            None => {
                std::thread::sleep(args.sample);
                let now = read(&maps)?;
                print(args, &maps, rows(&now, Some(&before)), false);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tcpgate sessions: {}", crate::error_chain(&e));
            1
        }
    }
}
