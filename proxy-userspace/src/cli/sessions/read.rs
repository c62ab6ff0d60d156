//! One reading of every source: their rows merged, and which answered.

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::{SessionRow, Source, admin, merge, pinned, routed};
use crate::pinned::{PinnedError, PinnedMaps};

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

/// Every source, opened once for all readings.
pub struct Sources {
    pub pin_dir: PathBuf,
    pub admin: admin::AdminSource,
    pub runtime: tokio::runtime::Runtime,
}

pub struct Reading {
    pub at: Instant,
    pub rows: Vec<SessionRow>,
    pub sources: Vec<SourceReport>,
}

impl Reading {
    /// Why nothing could be listed, when no source answered.
    pub fn nothing_answered(&self) -> Option<String> {
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
    pub fn read(&self) -> Reading {
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
            self.admin.location.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(source: Source, status: Status, detail: &str) -> SourceReport {
        SourceReport::new(source, "here".to_owned(), status, Some(detail.to_owned()))
    }

    fn reading(sources: Vec<SourceReport>) -> Reading {
        Reading {
            at: Instant::now(),
            rows: Vec::new(),
            sources,
        }
    }

    #[test]
    fn one_answering_source_is_enough_and_none_names_every_attempt() {
        let socket_down = report(Source::OperatorSocket, Status::Failed, "refused");
        let pinned = |status| report(Source::PinnedSessions, status, "no pin dir");
        let routed = report(Source::RoutedFlows, Status::Absent, "no pin dir");
        let some = reading(vec![
            pinned(Status::Answered),
            routed.clone(),
            socket_down.clone(),
        ]);
        assert_eq!(some.nothing_answered(), None);
        let none = reading(vec![pinned(Status::Absent), routed, socket_down]);
        assert_eq!(
            none.nothing_answered().as_deref(),
            Some("no pin dir; and the operator socket here did not answer (refused)")
        );
    }
}
