//! The table, the `--json` document, and the notes on stderr.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::{Datapath, Reading, SCHEMA, SessionRow, SessionsArgs, Source, SourceReport, Status};
use crate::cli::view;

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
pub fn note_failures(reading: &Reading, noted: &mut Vec<String>) {
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

pub fn print(args: &SessionsArgs, dir: &std::path::Path, reading: &Reading, watching: bool) {
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
