//! The runner ⇄ bastion ⇄ target namespace topology.
//!
//! ```text
//!  runner                 bastion                         target
//!  eth0 198.51.100.2 ─── to-runner 198.51.100.1
//!       2001:db8:100::2            2001:db8:100::1
//!                        to-target 192.0.2.1 ─────────── eth0 192.0.2.10 (+ .11 .12)
//!                                  2001:db8:2::1               2001:db8:2::10
//!                                                             203.0.113.10/32
//!                                                             2001:db8:203::10/128
//! ```
//!
//! The veth ends are created directly inside the namespaces, so their names
//! never meet the host's or another test's and can be fixed.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::netns::{Netns, NetnsError};

pub const RUNNER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const RUNNER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 2);
/// The bastion's address on the runner link (the runner's gateway).
pub const BASTION_RUNNER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const BASTION_RUNNER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
/// The bastion's address on the target link (the target's gateway).
pub const BASTION_TARGET_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const BASTION_TARGET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 1);
pub const TARGET_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// More target addresses on the same link and interface as [`TARGET_V4`].
pub const TARGET_V4_EXTRA: [Ipv4Addr; 2] =
    [Ipv4Addr::new(192, 0, 2, 11), Ipv4Addr::new(192, 0, 2, 12)];
pub const TARGET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 0x10);
/// The target's address in the second, routed "private" prefix.
pub const TARGET_PRIVATE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const TARGET_PRIVATE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0x10);

pub const RUNNER_NET_V4: &str = "198.51.100.0/24";
pub const RUNNER_NET_V6: &str = "2001:db8:100::/64";
pub const TARGET_NET_V4: &str = "192.0.2.0/24";
pub const TARGET_NET_V6: &str = "2001:db8:2::/64";
pub const PRIVATE_NET_V4: &str = "203.0.113.0/24";
pub const PRIVATE_NET_V6: &str = "2001:db8:203::/64";

/// The bastion's interface towards the runner.
pub const BASTION_RUNNER_IF: &str = "to-runner";
/// The bastion's interface towards the target.
pub const BASTION_TARGET_IF: &str = "to-target";
/// The runner's only interface (besides lo).
pub const RUNNER_IF: &str = "eth0";
/// The target's only interface (besides lo). It also holds the
/// private-prefix addresses: this kernel has no `dummy` link type.
pub const TARGET_IF: &str = "eth0";

const TENTATIVE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Waited(#[from] crate::NotWithin),
    #[error("IPv6 addresses in netns {netns} still tentative after {waited:?}: {addrs}")]
    Tentative {
        netns: String,
        waited: Duration,
        addrs: String,
    },
}

/// Three namespaces joined by veth pairs; the bastion forwards between them.
/// Dropping it removes the namespaces, their links and any process left in
/// them. Fields drop in declaration order.
#[derive(Debug)]
pub struct Topology {
    pub runner: Netns,
    pub bastion: Netns,
    pub target: Netns,
}

impl Topology {
    pub fn new() -> Result<Topology, TopologyError> {
        let topo = Topology {
            runner: Netns::new("r")?,
            bastion: Netns::new("b")?,
            target: Netns::new("t")?,
        };
        for ns in topo.all() {
            // Set before the links exist so they inherit it: link-local
            // addresses then need no DAD either and are usable at once.
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        topo.bastion.sysctl("net.ipv4.ip_forward", "1")?;
        topo.bastion.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        topo.link_runner()?;
        topo.link_target()?;
        for ns in topo.all() {
            wait_not_tentative(ns)?;
        }
        Ok(topo)
    }

    /// Spreads the receive processing of the bastion's two links over all
    /// CPUs (receive packet steering), as a multi-queue NIC's RSS would.
    /// A veth has none: a packet's receive path runs on the CPU that sent
    /// it. With it, the bastion handles a flow's packets on another CPU
    /// than the agent's, as on a real bastion.
    pub fn spread_bastion_receive(&self) -> Result<(), NetnsError> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let mask = cpu_mask(cpus);
        for link in [BASTION_RUNNER_IF, BASTION_TARGET_IF] {
            // `ip netns exec` mounts a /sys that shows the namespace's links.
            let script = format!(
                "for q in /sys/class/net/{link}/queues/rx-*; do echo {mask} > $q/rps_cpus; done"
            );
            self.bastion.exec_ok(&["sh", "-c", &script])?;
        }
        Ok(())
    }

    fn all(&self) -> [&Netns; 3] {
        [&self.runner, &self.bastion, &self.target]
    }

    fn link_runner(&self) -> Result<(), NetnsError> {
        let (b, r) = (&self.bastion, &self.runner);
        let peer = ["type", "veth", "peer", "name", RUNNER_IF, "netns", r.name()];
        b.ip(["link", "add", BASTION_RUNNER_IF].into_iter().chain(peer))?;
        add_addr(b, &format!("{BASTION_RUNNER_V4}/24"), BASTION_RUNNER_IF)?;
        add_addr(b, &format!("{BASTION_RUNNER_V6}/64"), BASTION_RUNNER_IF)?;
        add_addr(r, &format!("{RUNNER_V4}/24"), RUNNER_IF)?;
        add_addr(r, &format!("{RUNNER_V6}/64"), RUNNER_IF)?;
        b.ip(["link", "set", BASTION_RUNNER_IF, "up"])?;
        r.ip(["link", "set", RUNNER_IF, "up"])?;
        r.ip([
            "-4",
            "route",
            "add",
            "default",
            "via",
            &BASTION_RUNNER_V4.to_string(),
        ])?;
        r.ip([
            "-6",
            "route",
            "add",
            "default",
            "via",
            &BASTION_RUNNER_V6.to_string(),
        ])?;
        Ok(())
    }

    fn link_target(&self) -> Result<(), NetnsError> {
        let (b, t) = (&self.bastion, &self.target);
        let peer = ["type", "veth", "peer", "name", TARGET_IF, "netns", t.name()];
        b.ip(["link", "add", BASTION_TARGET_IF].into_iter().chain(peer))?;
        add_addr(b, &format!("{BASTION_TARGET_V4}/24"), BASTION_TARGET_IF)?;
        add_addr(b, &format!("{BASTION_TARGET_V6}/64"), BASTION_TARGET_IF)?;
        add_addr(t, &format!("{TARGET_V4}/24"), TARGET_IF)?;
        for extra in TARGET_V4_EXTRA {
            add_addr(t, &format!("{extra}/24"), TARGET_IF)?;
        }
        add_addr(t, &format!("{TARGET_V6}/64"), TARGET_IF)?;
        add_addr(t, &format!("{TARGET_PRIVATE_V4}/32"), TARGET_IF)?;
        add_addr(t, &format!("{TARGET_PRIVATE_V6}/128"), TARGET_IF)?;
        b.ip(["link", "set", BASTION_TARGET_IF, "up"])?;
        t.ip(["link", "set", TARGET_IF, "up"])?;
        t.ip([
            "-4",
            "route",
            "add",
            "default",
            "via",
            &BASTION_TARGET_V4.to_string(),
        ])?;
        t.ip([
            "-6",
            "route",
            "add",
            "default",
            "via",
            &BASTION_TARGET_V6.to_string(),
        ])?;
        b.ip([
            "-4",
            "route",
            "add",
            PRIVATE_NET_V4,
            "via",
            &TARGET_V4.to_string(),
        ])?;
        b.ip([
            "-6",
            "route",
            "add",
            PRIVATE_NET_V6,
            "via",
            &TARGET_V6.to_string(),
        ])?;
        Ok(())
    }
}

fn add_addr(ns: &Netns, cidr: &str, dev: &str) -> Result<(), NetnsError> {
    let mut args = vec!["addr", "add", cidr, "dev", dev];
    if cidr.contains(':') {
        args.push("nodad");
    }
    ns.ip(args)?;
    Ok(())
}

/// Waits (bounded) until no IPv6 address in `ns` is tentative, so sockets can
/// bind and connect at once.
fn wait_not_tentative(ns: &Netns) -> Result<(), TopologyError> {
    let mut tentative = String::new();
    let settled = crate::eventually(TENTATIVE_WAIT, "no tentative IPv6 address", || {
        tentative = ns.ip(["-6", "-o", "addr", "show", "tentative"])?;
        Ok::<_, TopologyError>(tentative.trim().is_empty())
    });
    match settled {
        Err(TopologyError::Waited(_)) => Err(TopologyError::Tentative {
            netns: ns.name().to_owned(),
            waited: TENTATIVE_WAIT,
            addrs: tentative.trim().to_owned(),
        }),
        other => other,
    }
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
    use super::cpu_mask;

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
