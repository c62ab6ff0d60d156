//! The `tcpgate-routed` contender: the agent with
//! `[intercept.routed_grants]` on, and a source grant for the runner on the
//! data-path services' ports, so iperf3 and the echo run as routed flows
//! (forwarded by the bastion, tracked by the tc programs) instead of
//! spliced sessions. Its connection rate is not measured: the routed path
//! has no per-connection agent work to measure, and a grant's SYNs take
//! it only while `FLOWS` has room.

use anyhow::{Context as _, Result, ensure};
use tcpgate_tests::Agent;
use tcpgate_tests::topology::BASTION_RUNNER_IF;

use super::contender::{Env, agent_config_extra, start_agent};
use super::{auth, ports};

/// The ports the grant covers: the throughput and latency services.
const DATA_PORTS: [u16; 2] = [ports::IPERF_INTERCEPTED, ports::ECHO_INTERCEPTED];

/// Starts the agent and takes a grant for the runner; the grant lasts the
/// turn (the agent and its grants go with the turn).
pub fn start(env: &Env<'_>) -> Result<Agent> {
    let keys = env
        .keys
        .context("tcpgate-routed needs an agent that accepts [auth] (a source grant)")?;
    let extra = agent_config_extra(Some(&keys.agent_sections_with(&DATA_PORTS))).replacen(
        "\n[intercept]\n",
        &format!("\n[intercept]\ninterfaces = [{BASTION_RUNNER_IF:?}]\n"),
        1,
    );
    ensure!(
        extra.contains("interfaces"),
        "no [intercept] table to extend"
    );
    let extra = format!("{extra}\n[intercept.routed_grants]\nenabled = true\nmax_flows = 1024\n");
    let agent = start_agent(env, "ebpf", &extra)?;
    let token = keys.token(3600);
    env.topo
        .runner
        .run(move || auth::request_grant_for(&token, &DATA_PORTS, "1h"))
        .context("a source grant for the runner")?;
    Ok(agent)
}
