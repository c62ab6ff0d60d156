//! Receive packet steering on the bastion's two links (`--rps`).
//!
//! A veth has no receive-side scaling: a packet's receive path runs on the
//! CPU that sent it. On the sockmap path that matters more than on the
//! others. The verdict program runs in that receive path, and the redirect
//! queues the peer's backlog work on the same CPU's bound workqueue, where
//! the scheduler cannot move it. A real bastion's multi-queue NIC spreads
//! flows over its CPUs in hardware. RPS does it in software, at the price of
//! an inter-processor interrupt per batch, which the other contenders pay
//! too. Off by default: the bench's anchors are measured without it.

use anyhow::{Context as _, Result};
use tcpgate_tests::Topology;

/// Lets every CPU take the receive processing of the bastion's links.
pub fn spread(topo: &Topology) -> Result<()> {
    topo.spread_bastion_receive()
        .context("--rps: setting rps_cpus on the bastion's links")
}
