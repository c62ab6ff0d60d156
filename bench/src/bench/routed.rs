//! The `tcpgate-routed` contender: the agent with
//! `[intercept.routed_grants]` on, and a source grant for the runner on the
//! data-path services' ports, so iperf3 and the echo run as routed flows
//! (forwarded by the bastion, tracked by the tc programs) instead of
//! spliced sessions. The connection-rate measure starts one too, for its
//! own port ([`CONN_SECTION`]: room in `FLOWS` for every flow of the run).

use anyhow::{Context as _, Result, ensure};
use tcpgate_tests::Agent;
use tcpgate_tests::topology::BASTION_RUNNER_IF;

use super::contender::{Env, agent_config_extra, start_agent};
use super::{auth, ports};

/// The ports the grant covers: the throughput and latency services.
const DATA_PORTS: [u16; 2] = [ports::IPERF_INTERCEPTED, ports::ECHO_INTERCEPTED];

/// `[intercept.routed_grants]` lines of the data-path turns.
const DATA_SECTION: &str = "max_flows = 1024\n";

/// For the connection-rate measure: ended flows leave `FLOWS` soon, and
/// it holds every flow of the run's seconds in between.
pub const CONN_SECTION: &str = "max_flows = 262144\nlinger = \"200ms\"\n";

/// Starts the agent and takes a grant for the runner; the grant lasts the
/// turn (the agent and its grants go with the turn).
pub fn start(env: &Env<'_>) -> Result<Agent> {
    start_for(env, &DATA_PORTS, DATA_SECTION)
}

/// [`start`] with a grant for `ports`, and `section` in
/// `[intercept.routed_grants]`.
pub fn start_for(env: &Env<'_>, ports: &[u16], section: &str) -> Result<Agent> {
    let keys = env
        .keys
        .context("tcpgate-routed needs an agent that accepts [auth] (a source grant)")?;
    let extra = agent_config_extra(Some(&keys.agent_sections_with(ports))).replacen(
        "\n[intercept]\n",
        &format!("\n[intercept]\ninterfaces = [{BASTION_RUNNER_IF:?}]\n"),
        1,
    );
    ensure!(
        extra.contains("interfaces"),
        "no [intercept] table to extend"
    );
    let extra = format!("{extra}\n[intercept.routed_grants]\nenabled = true\n{section}");
    let agent = start_agent(env, "ebpf", &extra)?;
    let token = keys.token(3600);
    let ports = ports.to_vec();
    env.topo
        .runner
        .run(move || auth::request_grant_for(&token, &ports, "1h"))
        .context("a source grant for the runner")?;
    Ok(agent)
}
