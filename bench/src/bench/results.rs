//! What the bench measured: runs per (metric, subject), in the order taken.

use serde::Serialize;

use super::stats::Summary;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    ThroughputOneStream,
    ThroughputEightStreams,
    CpuPerGib,
    CpuPerGibAttributed,
    LatencyP50,
    LatencyP99,
    ConnectionsPerSecond,
    AgentCpuPerConnection,
    CpuPerConnectionAttributed,
    RssIdleSessions,
    TeardownP50,
    TeardownP99,
    GrantApiP50,
    GrantApiP99,
    GrantsPerSecond,
    RevocationP50,
    RevocationP99,
    TakeoverTime,
    TakeoverPause,
    EbpfRunTime,
    EbpfCpuPerConnection,
}

impl Metric {
    pub const ALL: [Metric; 21] = [
        Metric::ThroughputOneStream,
        Metric::ThroughputEightStreams,
        Metric::CpuPerGib,
        Metric::CpuPerGibAttributed,
        Metric::LatencyP50,
        Metric::LatencyP99,
        Metric::ConnectionsPerSecond,
        Metric::AgentCpuPerConnection,
        Metric::CpuPerConnectionAttributed,
        Metric::RssIdleSessions,
        Metric::TeardownP50,
        Metric::TeardownP99,
        Metric::GrantApiP50,
        Metric::GrantApiP99,
        Metric::GrantsPerSecond,
        Metric::RevocationP50,
        Metric::RevocationP99,
        Metric::TakeoverTime,
        Metric::TakeoverPause,
        Metric::EbpfRunTime,
        Metric::EbpfCpuPerConnection,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Metric::ThroughputOneStream => "throughput, 1 stream",
            Metric::ThroughputEightStreams => "throughput, 8 streams",
            Metric::CpuPerGib => "CPU per GiB, whole machine",
            Metric::CpuPerGibAttributed => "CPU per GiB, bench processes + kernel threads",
            Metric::LatencyP50 => "64-byte request/response p50",
            Metric::LatencyP99 => "64-byte request/response p99",
            Metric::ConnectionsPerSecond => "new connections per second",
            Metric::AgentCpuPerConnection => "proxy CPU per new connection (agent, HAProxy)",
            Metric::CpuPerConnectionAttributed => {
                "CPU per new connection, bench processes + kernel threads"
            }
            Metric::RssIdleSessions => "agent RSS with idle sessions",
            Metric::TeardownP50 => "teardown after grant expiry p50",
            Metric::TeardownP99 => "teardown after grant expiry p99",
            Metric::GrantApiP50 => "grant API request p50 (TLS, new connection)",
            Metric::GrantApiP99 => "grant API request p99 (TLS, new connection)",
            Metric::GrantsPerSecond => "grants issued per second",
            Metric::RevocationP50 => "revocation on another bastion to session reset p50",
            Metric::RevocationP99 => "revocation on another bastion to session reset p99",
            Metric::TakeoverTime => "takeover at 1,000 sessions, successor start to ready",
            Metric::TakeoverPause => "longest stream pause during a takeover (8 streams)",
            Metric::EbpfRunTime => "eBPF program time per run (--bpf-stats)",
            Metric::EbpfCpuPerConnection => {
                "eBPF programs' time per new connection, all programs (--bpf-stats)"
            }
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::ThroughputOneStream | Metric::ThroughputEightStreams => "Gbit/s",
            Metric::CpuPerGib | Metric::CpuPerGibAttributed => "CPU s/GiB",
            Metric::LatencyP50 | Metric::LatencyP99 => "µs",
            Metric::ConnectionsPerSecond => "conn/s",
            Metric::AgentCpuPerConnection | Metric::CpuPerConnectionAttributed => "µs",
            Metric::RssIdleSessions => "MiB",
            Metric::TeardownP50 | Metric::TeardownP99 => "ms",
            Metric::GrantApiP50 | Metric::GrantApiP99 => "ms",
            Metric::GrantsPerSecond => "grants/s",
            Metric::RevocationP50 | Metric::RevocationP99 => "ms",
            Metric::TakeoverTime | Metric::TakeoverPause => "ms",
            Metric::EbpfRunTime => "ns",
            Metric::EbpfCpuPerConnection => "µs",
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::ThroughputOneStream
                | Metric::ThroughputEightStreams
                | Metric::ConnectionsPerSecond
                | Metric::GrantsPerSecond
        )
    }

    /// Data-path metrics compare every contender with direct and HAProxy.
    pub fn is_datapath(self) -> bool {
        matches!(
            self,
            Metric::ThroughputOneStream
                | Metric::ThroughputEightStreams
                | Metric::CpuPerGib
                | Metric::CpuPerGibAttributed
                | Metric::LatencyP50
                | Metric::LatencyP99
        )
    }
}

/// Every run of one figure.
#[derive(Debug, Clone)]
pub struct Series {
    pub metric: Metric,
    pub subject: String,
    pub runs: Vec<f64>,
}

#[derive(Debug, Default)]
pub struct Results {
    pub series: Vec<Series>,
    /// Things a reader of the numbers must know (fallbacks, failures).
    pub notes: Vec<String>,
}

impl Results {
    pub fn add(&mut self, metric: Metric, subject: &str, value: f64) {
        match self
            .series
            .iter_mut()
            .find(|s| s.metric == metric && s.subject == subject)
        {
            Some(series) => series.runs.push(value),
            None => self.series.push(Series {
                metric,
                subject: subject.to_owned(),
                runs: vec![value],
            }),
        }
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("bench: note: {note}");
        self.notes.push(note);
    }

    pub fn summary(&self, metric: Metric, subject: &str) -> Option<Summary> {
        self.series
            .iter()
            .find(|s| s.metric == metric && s.subject == subject)
            .and_then(|s| Summary::of(&s.runs))
    }

    pub fn median(&self, metric: Metric, subject: &str) -> Option<f64> {
        self.summary(metric, subject).map(|s| s.median)
    }

    /// The subjects measured for `metric`, in first-measured order.
    pub fn subjects(&self, metric: Metric) -> Vec<&str> {
        self.series
            .iter()
            .filter(|s| s.metric == metric)
            .map(|s| s.subject.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_accumulate_per_metric_and_subject() {
        let mut r = Results::default();
        r.add(Metric::LatencyP50, "direct", 100.0);
        r.add(Metric::LatencyP50, "haproxy", 150.0);
        r.add(Metric::LatencyP50, "direct", 120.0);
        r.add(Metric::LatencyP50, "direct", 110.0);
        assert_eq!(r.median(Metric::LatencyP50, "direct"), Some(110.0));
        assert_eq!(r.subjects(Metric::LatencyP50), ["direct", "haproxy"]);
        assert_eq!(r.median(Metric::LatencyP99, "direct"), None);
    }
}
