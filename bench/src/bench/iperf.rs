//! Bulk throughput with Debian's iperf3: servers on the target, the client
//! on the runner, and the CPU the whole machine spent meanwhile.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use tcpgate_tests::{ChildGuard, Topology};

use super::cpu::{self, BenchCgroup};
use super::interrupt;

/// iperf3 servers on the target, one per port; stopped on drop.
pub struct Servers {
    _children: Vec<ChildGuard>,
}

impl Servers {
    pub fn start(
        topo: &Topology,
        binds: &[SocketAddr],
        log_dir: &Path,
        cgroup: Option<&BenchCgroup>,
    ) -> Result<Servers> {
        let mut children = Vec::new();
        for bind in binds {
            let mut command = topo.target.command("iperf3");
            command.args([
                "--server",
                "--bind",
                &bind.ip().to_string(),
                "--port",
                &bind.port().to_string(),
            ]);
            let child = ChildGuard::spawn_logged(
                &mut command,
                log_dir,
                &format!("iperf3-server-{}", bind.port()),
            )?;
            if let Some(cgroup) = cgroup {
                cgroup.adopt(child.pid())?;
            }
            children.push(child);
        }
        for (child, bind) in children.iter_mut().zip(binds) {
            super::contender::wait_listening(&topo.target, &[*bind], child)?;
        }
        Ok(Servers {
            _children: children,
        })
    }
}

/// One iperf3 run.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    pub gbit_per_s: f64,
    pub bytes: u64,
    /// CPU seconds, all CPUs, while the client ran.
    pub cpu: cpu::CpuSpent,
}

impl Bulk {
    pub fn gib(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 30)
    }
}

/// Runs `iperf3 -c` from the runner to `addr` with `streams` parallel
/// streams for `seconds`.
pub fn run(
    topo: &Topology,
    addr: SocketAddr,
    streams: u32,
    seconds: u32,
    log_dir: &Path,
    cgroup: Option<&BenchCgroup>,
) -> Result<Bulk> {
    let mut command = topo.runner.command("iperf3");
    command.args([
        "--client",
        &addr.ip().to_string(),
        "--port",
        &addr.port().to_string(),
        "--parallel",
        &streams.to_string(),
        "--time",
        &seconds.to_string(),
        "--connect-timeout",
        "5000",
        "--json",
    ]);
    let start = cpu::mark(cgroup)?;
    let mut child = ChildGuard::spawn_logged(&mut command, log_dir, "iperf3-client")?;
    if let Some(cgroup) = cgroup {
        cgroup.adopt(child.pid())?;
    }
    let limit = Duration::from_secs(u64::from(seconds) + 20);
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.wait_timeout(Duration::from_millis(100))? {
            break status;
        }
        interrupt::check()?;
        if std::time::Instant::now() > deadline {
            bail!("iperf3 to {addr} did not finish within {limit:?}");
        }
    };
    let spent = cpu::since(&start, cgroup)?;
    let stdout = child.stdout();
    let report: Value = serde_json::from_str(&stdout).with_context(|| {
        format!(
            "iperf3 to {addr} ({status}) printed no JSON report: {}",
            child.stderr_tail(5)
        )
    })?;
    let (bytes, seconds) = received(&report)
        .with_context(|| format!("iperf3 to {addr} ({status}) failed: {}", report["error"]))?;
    Ok(Bulk {
        gbit_per_s: bytes as f64 * 8.0 / seconds / 1e9,
        bytes,
        cpu: spent,
    })
}

/// Bytes the receiver got and over how long, from an iperf3 JSON report.
fn received(report: &Value) -> Option<(u64, f64)> {
    let sum = &report["end"]["sum_received"];
    let bytes = sum["bytes"].as_u64()?;
    let seconds = sum["seconds"].as_f64()?;
    (bytes > 0 && seconds > 0.0).then_some((bytes, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_receiver_sum() {
        let report: Value = serde_json::from_str(
            r#"{"start":{},"end":{"sum_sent":{"bytes":2000,"seconds":2.0},
                "sum_received":{"bytes":1000,"seconds":2.5}}}"#,
        )
        .expect("json");
        assert_eq!(received(&report), Some((1000, 2.5)));
    }

    #[test]
    fn a_failed_run_has_no_sum() {
        let report: Value =
            serde_json::from_str(r#"{"start":{},"end":{},"error":"unable to connect"}"#)
                .expect("json");
        assert_eq!(received(&report), None);
    }
}
