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
mod output;
mod pinned;
mod read;
mod routed;
mod row;

use std::path::PathBuf;
use std::time::Duration;

use super::view;
use read::Sources;
pub use read::{Reading, SourceReport, Status};
pub use row::{Datapath, SessionRow, Source};

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
        Ok(endpoint) => Ok(endpoint),
        // A bad --admin is the caller's mistake.
        Err(e @ super::AdminError::BadEndpoint(_)) => {
            eprintln!("tcpgate sessions: {}", crate::error_chain(&e));
            return crate::config::EXIT_CONFIG;
        }
        // An unusable configuration only costs the operator socket.
        Err(e) => Err((
            format!("[admin] of {}", args.admin.config.display()),
            crate::error_chain(&e),
        )),
    };
    let Some(runtime) = super::current_thread_runtime() else {
        return 1;
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
            output::note_failures(reading, &mut noted);
        }
        output::print(args, dir, reading, watching);
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
