//! CPU time spent while a measure runs, two ways:
//!
//! - system-wide from `/proc/stat` (all CPUs; user, nice, system, irq and
//!   softirq), so kernel work such as the veth and TCP stacks and the eBPF
//!   verdict program counts too. On a shared machine this also counts other
//!   people's builds, so we also keep
//! - the CPU attributed to the bench: its own processes (agent, HAProxy,
//!   socat, iperf3) from a cgroup v2 directory they are moved into, plus
//!   every kernel thread (kworkers run the sockmap's backlog work,
//!   ksoftirqd the deferred network softirqs). It misses softirq work that
//!   happened to interrupt another tenant's task, and counts the few kernel
//!   threads that work for others.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// Clock ticks per second in `/proc/stat` (`USER_HZ`, 100 on Linux).
fn user_hz() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Busy CPU seconds summed over all CPUs, from the `cpu` line of
/// `/proc/stat` text. Idle, iowait and steal are not busy; guest time is
/// already inside user.
pub fn busy_ticks(proc_stat: &str) -> Result<u64> {
    let line = proc_stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no aggregate `cpu` line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected /proc/stat line: {line}"))?;
    if fields.len() < 7 {
        bail!(
            "/proc/stat `cpu` line has {} fields, need 7: {line}",
            fields.len()
        );
    }
    // user nice system idle iowait irq softirq [steal guest guest_nice]
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6])
}

/// The bench's cgroup v2 directory. Dropping it kills whatever is left in
/// it and removes the directory.
#[derive(Debug)]
pub struct BenchCgroup {
    dir: PathBuf,
}

/// Where cgroup v2 is mounted on these machines (hybrid layout), or on a
/// pure v2 host.
const CGROUP2_ROOTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

impl BenchCgroup {
    /// Creates `tgbench-<pid>` under the cgroup v2 root; `None` (with a
    /// note) when there is none we can use.
    pub fn create() -> Option<BenchCgroup> {
        let root = CGROUP2_ROOTS
            .iter()
            .map(Path::new)
            .find(|root| root.join("cgroup.procs").exists() && root.join("cpu.stat").exists())?;
        let dir = root.join(format!("tgbench-{}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => Some(BenchCgroup { dir }),
            Err(err) => {
                eprintln!(
                    "bench: cannot create {} ({err}); the per-process CPU figure is left out",
                    dir.display()
                );
                None
            }
        }
    }

    /// Moves process `pid` (all its threads, and its future children) in.
    pub fn adopt(&self, pid: u32) -> Result<()> {
        let procs = self.dir.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .with_context(|| format!("cannot move pid {pid} into {}", procs.display()))
    }

    /// CPU seconds used by everything that has been in the cgroup.
    pub fn usage_seconds(&self) -> Result<f64> {
        let path = self.dir.join("cpu.stat");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        usage_usec(&text)
            .map(|usec| usec as f64 / 1e6)
            .with_context(|| format!("{} has no usage_usec", path.display()))
    }
}

fn usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // Children normally left with their guards; kill stragglers so the
        // directory can go.
        let _ = fs::write(self.dir.join("cgroup.kill"), "1");
        for _ in 0..100 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        eprintln!("bench: could not remove cgroup {}", self.dir.display());
    }
}

/// `(ppid, utime + stime)` from the text of `/proc/<pid>/stat`. The
/// command name may hold spaces and parentheses, so fields are counted
/// from the last `)`.
fn ppid_and_ticks(stat: &str) -> Option<(u32, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `utime + stime` of a process from the text of its `/proc/<pid>/stat`.
pub fn own_ticks(stat: &str) -> Option<u64> {
    ppid_and_ticks(stat).map(|(_, ticks)| ticks)
}

/// CPU ticks of every kernel thread (children of kthreadd, pid 2), by pid.
fn kernel_thread_ticks() -> HashMap<u32, u64> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (ppid, ticks) = ppid_and_ticks(&stat)?;
            (ppid == 2 || pid == 2).then_some((pid, ticks))
        })
        .collect()
}

/// A CPU reading taken before a measure.
#[derive(Debug, Clone)]
pub struct CpuMark {
    busy_ticks: u64,
    bench_seconds: Option<f64>,
    kthreads: HashMap<u32, u64>,
}

/// CPU seconds spent between a [`CpuMark`] and now.
#[derive(Debug, Clone, Copy)]
pub struct CpuSpent {
    /// All CPUs, every task: `/proc/stat`.
    pub system_seconds: f64,
    /// The bench's processes plus kernel threads (needs the cgroup).
    pub attributed_seconds: Option<f64>,
}

pub fn mark(cgroup: Option<&BenchCgroup>) -> Result<CpuMark> {
    Ok(CpuMark {
        busy_ticks: busy_ticks(&fs::read_to_string("/proc/stat").context("read /proc/stat")?)?,
        bench_seconds: cgroup.map(BenchCgroup::usage_seconds).transpose()?,
        kthreads: kernel_thread_ticks(),
    })
}

pub fn since(start: &CpuMark, cgroup: Option<&BenchCgroup>) -> Result<CpuSpent> {
    let now = mark(cgroup)?;
    // Threads that appeared meanwhile count from zero; ones that exited
    // are lost (kworkers rarely exit within seconds).
    let kthread_ticks: u64 = now
        .kthreads
        .iter()
        .map(|(pid, &ticks)| ticks.saturating_sub(start.kthreads.get(pid).copied().unwrap_or(0)))
        .sum();
    let hz = user_hz();
    Ok(CpuSpent {
        system_seconds: now.busy_ticks.saturating_sub(start.busy_ticks) as f64 / hz,
        attributed_seconds: match (start.bench_seconds, now.bench_seconds) {
            (Some(a), Some(b)) => Some((b - a).max(0.0) + kthread_ticks as f64 / hz),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_counts_user_nice_system_irq_softirq() {
        let stat = "cpu  100 2 30 5000 7 4 9 11 0 0\ncpu0 50 1 15 2500 3 2 4 5 0 0\nintr 1\n";
        assert_eq!(busy_ticks(stat).expect("parses"), 100 + 2 + 30 + 4 + 9);
    }

    #[test]
    fn busy_ticks_rejects_bad_text() {
        assert!(busy_ticks("cpu0 1 2 3\n").is_err());
        assert!(busy_ticks("cpu  1 2 x 4 5 6 7\n").is_err());
        assert!(busy_ticks("cpu  1 2 3\n").is_err());
    }

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let stat =
            "77 (kworker/u8:0 (x) y) I 2 0 0 0 -1 69238880 0 0 0 0 150 1700 0 0 20 0 1 0 5 0 0";
        assert_eq!(ppid_and_ticks(stat), Some((2, 1850)));
        assert_eq!(ppid_and_ticks("garbage"), None);
    }

    #[test]
    fn kernel_threads_are_found() {
        // kthreadd itself is always there on Linux.
        assert!(kernel_thread_ticks().contains_key(&2));
    }

    #[test]
    fn cgroup_usage_is_read_from_cpu_stat() {
        assert_eq!(
            usage_usec("usage_usec 391927\nuser_usec 391927\n"),
            Some(391_927)
        );
        assert_eq!(usage_usec("user_usec 1\n"), None);
    }
}
