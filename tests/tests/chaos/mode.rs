//! How big a chaos run is, which seed drives it, and how its figures are
//! reported.
//!
//! By default every case runs in a bounded form sized for CI (`.ci/run`
//! runs `cargo xtask test` without `--chaos`); `TCPGATE_CHAOS=1` (set by
//! `cargo xtask test --chaos`) runs the full numbers. Every random
//! choice comes from one seed, printed at the start of each case;
//! `TCPGATE_CHAOS_SEED=<n>` replays it.

use std::fmt::Display;
use std::io::Write as _;
use std::time::{Duration, Instant};

use rand::SeedableRng as _;
use rand::rngs::StdRng;

/// Set to `1` for the full run.
pub const FULL_ENV: &str = "TCPGATE_CHAOS";
/// A seed to replay.
pub const SEED_ENV: &str = "TCPGATE_CHAOS_SEED";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// CI: every case, smaller counts and sizes.
    Bounded,
    /// `TCPGATE_CHAOS=1`: the numbers.
    Full,
}

impl Scale {
    pub fn from_env() -> Self {
        match std::env::var(FULL_ENV) {
            Ok(value) if value == "1" => Self::Full,
            _ => Self::Bounded,
        }
    }

    pub fn is_full(self) -> bool {
        self == Self::Full
    }

    /// `bounded` in CI, `full` with `TCPGATE_CHAOS=1`.
    pub fn pick<T>(self, bounded: T, full: T) -> T {
        match self {
            Self::Bounded => bounded,
            Self::Full => full,
        }
    }
}

/// One chaos case: its scale, its seeded generator, and its report lines.
pub struct Case {
    pub name: &'static str,
    pub scale: Scale,
    pub rng: StdRng,
    started: Instant,
}

impl Case {
    pub fn new(name: &'static str) -> anyhow::Result<Self> {
        let seed: u64 = match std::env::var(SEED_ENV) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("{SEED_ENV}={text:?} is not a u64: {e}"))?,
            Err(_) => rand::random(),
        };
        let scale = Scale::from_env();
        let case = Self {
            name,
            scale,
            // Each case draws from its own stream, so replaying one case
            // alone gives it the same numbers as in the whole run.
            rng: StdRng::seed_from_u64(seed ^ fnv1a(name)),
            started: Instant::now(),
        };
        case.figure(
            "run",
            format!("{scale:?}, seed {seed} (replay with {SEED_ENV}={seed})"),
        );
        Ok(case)
    }

    /// Prints one figure of the case. Written to the stderr file itself,
    /// not through `eprintln!`, so the harness does not swallow it in a
    /// passing run: CI logs always show the figures.
    pub fn figure(&self, label: &str, value: impl Display) {
        let line = format!("chaos {}: {label}: {value}\n", self.name);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() {
            "panicked"
        } else {
            "done"
        };
        self.figure(outcome, format!("{:.1} s", self.elapsed().as_secs_f64()));
    }
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Milliseconds, for figures.
pub fn ms(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1000.0)
}

/// Mebibytes, for figures.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
