//! The machine the figures come from, and how busy it was.

use std::process::Command;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub date: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// `/proc/loadavg` (1, 5, 15 min) when the bench started and ended.
    pub load_before: String,
    pub load_after: String,
    pub tools: Vec<String>,
    /// `net.ipv4.tcp_congestion_control` outside the bench's namespaces
    /// (the bench sets its own in them, see `Settings`).
    pub congestion_control_default: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: cpu_model(&cpuinfo).unwrap_or("unknown").to_owned(),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            load_before: load_average(),
            load_after: String::new(),
            tools: [("haproxy", "-v"), ("iperf3", "--version"), ("socat", "-V")]
                .iter()
                .map(|(tool, flag)| version(tool, flag))
                .collect(),
            congestion_control_default: super::congestion::machine_default(),
        }
    }

    pub fn finish(&mut self) {
        self.load_after = load_average();
    }
}

/// A file's content, trimmed, or "unknown" when it cannot be read.
pub(super) fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The first three fields of /proc/loadavg.
pub fn load_average() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cpu_model(cpuinfo: &str) -> Option<&str> {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim())
}

/// The version line of `tool` (the line that names a version).
fn version(tool: &str, flag: &str) -> String {
    let Ok(output) = Command::new(tool).arg(flag).output() else {
        return format!("{tool}: not found");
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.lines()
        .find(|l| l.to_ascii_lowercase().contains("version") || l.starts_with("iperf"))
        .map_or_else(
            || format!("{tool}: unknown version"),
            |l| l.trim().to_owned(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_from_cpuinfo() {
        let info =
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t: fpu\n";
        assert_eq!(cpu_model(info), Some("AMD EPYC"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }
}
