//! `tcpgate-bench bench` (run by `cargo xtask bench`): tcpgate against the direct path, HAProxy, socat and
//! its own user-space fallback, in network namespaces of its own.
//!
//! The runner ⇄ bastion ⇄ target topology is the tests' one
//! ([`tcpgate_tests::Topology`]). Every contender runs on the bastion, one at
//! a time, taking turns within each repetition; see [`phases`] for the
//! measures and [`contender`] for how each one is set up. The results go to
//! `target/bench/` (results.json, results.md, chart.svg).

mod auth;
mod baselines;
mod congestion;
mod conn_phase;
mod connrate;
mod contender;
mod cpu;
mod fleet;
mod goals;
mod interrupt;
mod iperf;
mod latency;
mod machine;
mod phases;
mod program_costs;
mod report;
mod results;
mod routed;
mod servers;
mod sessions;
mod settings;
mod stats;
mod svg;
mod takeover;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use tcpgate_tests::{Netns, Topology};

use servers::Behaviour;
pub use settings::BenchArgs;

/// Ports on the target (and the bastion, for HAProxy and socat).
pub mod ports {
    /// iperf3, dialled directly and behind HAProxy and socat.
    pub const IPERF: u16 = 5201;
    /// iperf3 on a port tcpgate intercepts.
    pub const IPERF_INTERCEPTED: u16 = 5202;
    /// Where HAProxy and socat listen (bastion) for iperf3.
    pub const IPERF_PROXIED: u16 = 15201;
    pub const ECHO: u16 = 7001;
    pub const ECHO_INTERCEPTED: u16 = 7002;
    pub const ECHO_PROXIED: u16 = 17001;
    /// One-byte echo, then close: per-connection preamble (and no-auth).
    pub const CONN_PREAMBLE: u16 = 8001;
    /// Idle sessions held open.
    pub const IDLE: u16 = 8002;
    /// Sessions ended by grant expiry.
    pub const TEARDOWN: u16 = 8003;
    /// One-byte echo, then close: admitted by a source-bound grant.
    pub const CONN_GRANT: u16 = 8004;
    /// One-byte echo, then close: a source grant's routed flows. A port of
    /// its own: a 4-tuple the bastion still holds in TIME_WAIT from the
    /// terminated `CONN_GRANT` cycles would take the intercepting path.
    pub const CONN_ROUTED: u16 = 8006;
    /// One-byte echo, then close, on a port tcpgate does not intercept:
    /// plain TCP directly and behind HAProxy (a stopped agent's pinned
    /// programs still steer its intercepted ports).
    pub const CONN_PLAIN: u16 = 8005;
    /// Where HAProxy and socat listen (bastion) for the connection rate.
    pub const CONN_PROXIED: u16 = 18001;
    /// The agent's grant API, on the bastion's runner-side address.
    pub const GRANT_API: u16 = 8443;
}

/// Replaces the agent binary, e.g. with a script that execs the release
/// agent under `valgrind --tool=massif` or `perf record`, to profile it.
const AGENT_OVERRIDE_ENV: &str = "TCPGATE_BENCH_AGENT";

/// Programs the bench runs, with the Debian package that has each.
const TOOLS: [(&str, &str); 5] = [
    ("iperf3", "iperf3"),
    ("haproxy", "haproxy"),
    ("socat", "socat"),
    ("openssl", "openssl"),
    ("ss", "iproute2"),
];

pub fn run(tcpgate: &Path, args: &BenchArgs) -> Result<()> {
    if !crate::is_root() {
        bail!("the bench needs root: it creates network namespaces and loads eBPF");
    }
    let mut settings = settings::Settings::from_args(args)?;
    interrupt::install()?;
    // For profiling: a wrapper that execs the agent under perf, valgrind...
    let agent_binary = match std::env::var_os(AGENT_OVERRIDE_ENV) {
        Some(wrapper) if !wrapper.is_empty() => {
            println!(
                "bench: running the agent as {} (from ${AGENT_OVERRIDE_ENV}); figures are not comparable",
                PathBuf::from(&wrapper).display()
            );
            PathBuf::from(wrapper)
        }
        _ => tcpgate.to_owned(),
    };
    for (tool, package) in TOOLS {
        if which::which(tool).is_err() {
            bail!("`{tool}` is missing; install it with `apt-get install {package}`");
        }
    }
    let mut results = results::Results::default();
    // The load generator and the servers run in this process: unoptimized,
    // they throttle the connection-rate and latency figures.
    if cfg!(debug_assertions) {
        results.note(
            "tcpgate-bench is an unoptimized build: connection rates and latencies are \
             understated (`cargo xtask bench` builds it with --release)"
                .to_owned(),
        );
    }
    fit_sessions_to_fd_limit(&mut settings, &mut results)?;
    let out_dir = &args.out;
    let started = Instant::now();
    let mut machine = machine::Machine::describe();
    println!(
        "bench: {} mode, {} runs; {} × {}, Linux {}, load average {}; TCP congestion control {} \
         (machine default {}); pid {pid} (namespaces tg[rbt]{pid}-*)",
        settings.mode,
        settings.runs,
        machine.nproc,
        machine.cpu_model,
        machine.kernel,
        machine.load_before,
        settings.congestion_control,
        machine.congestion_control_default,
        pid = std::process::id(),
    );
    let outcome = measure_all(&settings, &agent_binary, &mut results, started);
    machine.finish();
    // Whatever was measured is reported, also after a failure or Ctrl-C.
    let goals = goals::evaluate(&results);
    print!("{}", report::terminal(&results, &goals));
    if !results.series.is_empty() {
        report::write_all(out_dir, &results, &goals, &machine, &settings)?;
        println!(
            "\nbench: wrote {} (results.json, results.md, chart.svg) in {}; load average {} → {}",
            out_dir.display(),
            took(started),
            machine.load_before,
            machine.load_after
        );
    }
    outcome
}

/// Seconds since `started`, for progress lines.
fn took(started: Instant) -> String {
    format!("{:.1}s", started.elapsed().as_secs_f64())
}

/// Sets up the namespaces and servers, runs every phase, and tears it all
/// down (guards, in reverse order) before returning.
fn measure_all(
    settings: &settings::Settings,
    agent_binary: &std::path::Path,
    results: &mut results::Results,
    started: Instant,
) -> Result<()> {
    let work = contender::work_dir()?;
    // Held to the end: the fleet's namespaces take the algorithm too.
    let _allowed = settings.congestion_control.allow()?;
    // On for the whole run, off again when dropped (or if the bench dies).
    let _stats = settings
        .bpf_stats
        .then(tcpgate_tests::bpf_stats::RunStatsOn::enable)
        .transpose()
        .context("--bpf-stats: turning on the kernel's eBPF run statistics")?;
    let cgroup = cpu::BenchCgroup::create();
    let topo = Topology::new().context("creating the runner, bastion and target namespaces")?;
    settings.congestion_control.pin(&topo)?;
    if settings.rps {
        // veth has no RSS; see `--rps` and notes-issue-17.md.
        topo.spread_bastion_receive()
            .context("--rps: setting rps_cpus on the bastion's links")?;
    }
    for ns in [&topo.runner, &topo.bastion] {
        tune_client_side(ns)?;
    }
    let _iperf = iperf::Servers::start(
        &topo,
        &[
            contender::target_bind(ports::IPERF),
            contender::target_bind(ports::IPERF_INTERCEPTED),
        ],
        work.path(),
        cgroup.as_ref(),
    )?;
    let servers = servers::Servers::start(
        &topo.target,
        &[
            (contender::target_bind(ports::ECHO), Behaviour::Echo),
            (
                contender::target_bind(ports::ECHO_INTERCEPTED),
                Behaviour::Echo,
            ),
            (
                contender::target_bind(ports::CONN_PREAMBLE),
                Behaviour::OneByteThenClose,
            ),
            (
                contender::target_bind(ports::CONN_GRANT),
                Behaviour::OneByteThenClose,
            ),
            (
                contender::target_bind(ports::CONN_PLAIN),
                Behaviour::OneByteThenClose,
            ),
            (
                contender::target_bind(ports::CONN_ROUTED),
                Behaviour::OneByteThenClose,
            ),
            (contender::target_bind(ports::IDLE), Behaviour::Hold),
            (contender::target_bind(ports::TEARDOWN), Behaviour::Observe),
        ],
    )?;
    let keys = auth::Keys::generate(work.path())?;
    let keys = auth_supported(agent_binary, work.path(), &keys, results)?.then_some(&keys);
    let env = contender::Env {
        topo: &topo,
        agent_binary,
        cgroup: cgroup.as_ref(),
        work_dir: work.path(),
        keys,
    };
    let bench = phases::Bench {
        env,
        settings,
        shared: &servers.shared,
        keys,
        started,
    };
    phases::datapath(&bench, results)?;
    conn_phase::connrate(&bench, results)?;
    phases::rss(&bench, results)?;
    phases::teardown(&bench, results)?;
    takeover::measure(&bench, results)?;
    if settings.wants(settings::Measure::Fleet) {
        if keys.is_some() {
            fleet::run(agent_binary, settings, results).context("the fleet measures")?;
        } else {
            results.note("the fleet measures need [auth]; skipped");
        }
    }
    Ok(())
}

/// Whether this agent accepts the `[auth]`, `[[policy]]` and `[api]`
/// sections (`tcpgate check-config`); if not, the authentication measures
/// fall back or are skipped, with a note.
fn auth_supported(
    agent_binary: &std::path::Path,
    dir: &std::path::Path,
    keys: &auth::Keys,
    results: &mut results::Results,
) -> Result<bool> {
    let path: PathBuf = dir.join("auth-check.toml");
    std::fs::write(
        &path,
        contender::agent_config_extra(Some(&keys.agent_sections())),
    )?;
    let output = std::process::Command::new(agent_binary)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .context("run tcpgate check-config")?;
    if output.status.success() {
        return Ok(true);
    }
    results.note(format!(
        "this agent rejects the [auth]/[api] config, so connection rates have only the no-auth \
         baseline, RSS is without tokens and teardown is skipped: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    ));
    Ok(false)
}

/// Load-generator hygiene for namespaces that open many connections: a
/// wide ephemeral port range, and reuse of TIME_WAIT ports for outgoing
/// connections, so repeated runs never run out of ports.
fn tune_client_side(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    Ok(())
}

/// File descriptors kept free for everything but the sessions' sockets.
const FD_RESERVE: u64 = 200;

/// Raises the open-files limit to its hard limit. The agent holds two
/// sockets per session, and so does the bench (the runner and the target
/// ends), so with a hard limit under 2 × 10,000 plus a reserve the idle
/// sessions are capped to what fits, with a note; the RSS figure is then
/// extrapolated to 10,000 from the measured per-session growth.
fn fit_sessions_to_fd_limit(
    settings: &mut settings::Settings,
    results: &mut results::Results,
) -> Result<()> {
    let hard = raise_nofile_to_hard()?;
    let fits = hard.saturating_sub(FD_RESERVE) / 2;
    if fits < u64::from(settings.idle_sessions) {
        let capped = u32::try_from(fits).unwrap_or(u32::MAX);
        results.note(format!(
            "RLIMIT_NOFILE is capped at {hard} here (raising it needs CAP_SYS_RESOURCE), and the \
             agent needs two sockets per session: idle sessions are measured at {capped} and the \
             RSS is extrapolated linearly to {}",
            settings.idle_sessions
        ));
        settings.idle_sessions_measured = capped;
    }
    Ok(())
}

/// Sets the soft open-files limit to the hard one; returns it.
fn raise_nofile_to_hard() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads one initialised rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!(
            "cannot raise the open-files limit to {}: {}",
            limit.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok(limit.rlim_max)
}
