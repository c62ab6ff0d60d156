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
use tcpgate_tests::topology::{BASTION_RUNNER_IF, BASTION_TARGET_IF};

/// Lets every CPU take the receive processing of the bastion's links.
pub fn spread(topo: &Topology, cpus: usize) -> Result<()> {
    let mask = cpu_mask(cpus);
    for link in [BASTION_RUNNER_IF, BASTION_TARGET_IF] {
        // `ip netns exec` mounts a /sys of the namespace's own links.
        let script = format!(
            "for q in /sys/class/net/{link}/queues/rx-*; do echo {mask} > $q/rps_cpus; done"
        );
        topo.bastion
            .exec_ok(&["sh", "-c", &script])
            .with_context(|| format!("--rps: setting rps_cpus on the bastion's {link}"))?;
    }
    Ok(())
}

/// `rps_cpus` for the first `cpus` CPUs: hex, in comma-separated 32-bit
/// groups, the highest group first (the kernel's cpumask format).
fn cpu_mask(cpus: usize) -> String {
    let cpus = cpus.max(1);
    let groups = cpus.div_ceil(32);
    (0..groups)
        .rev()
        .map(|g| {
            let bits = (cpus - g * 32).min(32);
            let group = if bits == 32 {
                u32::MAX
            } else {
                (1u32 << bits) - 1
            };
            if g + 1 == groups {
                format!("{group:x}")
            } else {
                format!("{group:08x}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_in_the_kernels_cpumask_format() {
        assert_eq!(cpu_mask(1), "1");
        assert_eq!(cpu_mask(2), "3");
        assert_eq!(cpu_mask(8), "ff");
        assert_eq!(cpu_mask(32), "ffffffff");
        assert_eq!(cpu_mask(33), "1,ffffffff");
        assert_eq!(cpu_mask(64), "ffffffff,ffffffff");
        assert_eq!(cpu_mask(0), "1", "at least one CPU");
    }
}
