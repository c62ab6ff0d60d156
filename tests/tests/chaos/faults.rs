//! Case 3: the upstream fails mid-stream while legitimate sessions stream.
//!
//! Four faulty sessions run at once, each streaming up without pause:
//! - the upstream resets after 1 MiB;
//! - the upstream stops reading after 1 MiB (a zero window that never
//!   opens);
//! - the upstream host's link is removed (the bastion's veth deleted);
//! - the upstream host's namespace is deleted (link down first so its
//!   sockets die without a word on the wire, as a vanished host would).
//!
//! The two hosts that vanish are "islands": namespaces of their own behind
//! the bastion, so the legitimate streams to the target are untouched.
//! With `stall_timeout = 3s`, every faulty client must see its connection
//! end (bounded wait; the times are printed, not asserted), the audit must
//! say why, and the agent must keep nothing of those sessions.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rand::Rng as _;
use tcpgate_tests::{Netns, Topology};

use super::client::EchoClient;
use super::fixture::{Fixture, Options, SERVICE_PORT, service};
use super::mode::{Case, ms};
use super::streams::Streams;
use super::upstream::Upstream;
use super::wire::{Kind, Spec};

const MIB: u64 = 1024 * 1024;
/// `agent.stall_timeout` for this case.
const STALL: Duration = Duration::from_secs(3);
/// How long a faulty client may wait for its end before it counts as hung.
const CLOSE_BOUND: Duration = Duration::from_secs(25);

pub fn run_ebpf(case: &mut Case) -> Result<()> {
    run(case, "ebpf")
}

pub fn run_userspace(case: &mut Case) -> Result<()> {
    run(case, "userspace")
}

/// An upstream host of its own behind the bastion: a namespace with one
/// veth to the bastion, in 203.0.113.128/27, serving the chaos protocol.
struct Island {
    link: String,
    host: Ipv4Addr,
    upstream: Option<Upstream>,
    ns: Option<Netns>,
}

impl Island {
    fn new(topo: &Topology, index: u8) -> Result<Self> {
        let ns = Netns::new("i")?;
        let link = format!("to-gone{index}");
        let base = 128 + 16 * index;
        let (gateway, host) = (
            Ipv4Addr::new(203, 0, 113, base + 1),
            Ipv4Addr::new(203, 0, 113, base + 2),
        );
        let peer = ["type", "veth", "peer", "name", "eth0", "netns", ns.name()];
        topo.bastion
            .ip(["link", "add", link.as_str()].into_iter().chain(peer))?;
        topo.bastion
            .ip(["addr", "add", &format!("{gateway}/28"), "dev", &link])?;
        ns.ip(["addr", "add", &format!("{host}/28"), "dev", "eth0"])?;
        topo.bastion.ip(["link", "set", &link, "up"])?;
        ns.ip(["link", "set", "eth0", "up"])?;
        ns.ip(["route", "add", "default", "via", &gateway.to_string()])?;
        let upstream = Upstream::start_tracked(&ns, SocketAddr::from((host, SERVICE_PORT)))?;
        Ok(Self {
            link,
            host,
            upstream: Some(upstream),
            ns: Some(ns),
        })
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.host, SERVICE_PORT))
    }

    /// Deletes the bastion's veth to the island (and with it the island's).
    fn remove_link(&self, topo: &Topology) -> Result<Instant> {
        let at = Instant::now();
        topo.bastion.ip(["link", "del", self.link.as_str()])?;
        Ok(at)
    }

    /// Makes the island vanish: link down (nothing more leaves it), its
    /// sockets aborted, its namespace deleted; waits until the kernel has
    /// destroyed the namespace, which takes the bastion's veth with it.
    fn delete_namespace(&mut self, topo: &Topology) -> Result<Instant> {
        let at = Instant::now();
        if let Some(ns) = &self.ns {
            ns.ip(["link", "set", "eth0", "down"])?;
        }
        self.sink();
        tcpgate_tests::eventually(
            Duration::from_secs(15),
            &format!(
                "namespace of {} deleted: the bastion to lose {}",
                self.host, self.link
            ),
            || {
                topo.bastion
                    .ip(["link", "show", self.link.as_str()])
                    .is_err()
            },
        )?;
        Ok(at)
    }

    fn sink(&mut self) {
        if let Some(upstream) = self.upstream.take() {
            upstream.ledger.sever();
        }
        drop(self.ns.take());
    }
}

impl Drop for Island {
    fn drop(&mut self) {
        self.sink();
    }
}

struct Faulty {
    name: &'static str,
    client: EchoClient,
    local: SocketAddr,
}

fn open(fx: &Fixture, name: &'static str, addr: SocketAddr, spec: Spec) -> Result<Faulty> {
    let stream = fx.dial_to(addr)?;
    let local = stream.local_addr()?;
    Ok(Faulty {
        name,
        client: EchoClient::start_with(stream, spec, None)?,
        local,
    })
}

fn run(case: &mut Case, datapath: &'static str) -> Result<()> {
    let options = Options {
        datapath,
        ..Options::ebpf()
    }
    .agent(&format!("stall_timeout = \"{}s\"", STALL.as_secs()))
    .agent("drain_timeout = \"3s\"");
    let fx = Fixture::start(options)?;
    let mut islands = [Island::new(&fx.topo, 0)?, Island::new(&fx.topo, 1)?];
    let streams = Streams::start(&fx, 2, case.rng.random(), Some(32 * MIB))?;
    let echo = |rng: &mut rand::rngs::StdRng| Spec::of(Kind::Echo, rng.random(), 0, 0, 0);
    let (reset_seed, stall_seed) = (case.rng.random(), case.rng.random());
    let faulty = [
        open(
            &fx,
            "reset",
            service(),
            Spec::of(Kind::ResetAfter, reset_seed, 0, 0, MIB),
        )?,
        open(
            &fx,
            "zero window",
            service(),
            Spec::of(Kind::StallAfter, stall_seed, 0, 0, MIB),
        )?,
        open(&fx, "link removed", islands[0].addr(), echo(&mut case.rng))?,
        open(
            &fx,
            "namespace deleted",
            islands[1].addr(),
            echo(&mut case.rng),
        )?,
    ];
    fx.wait_audit("session_open", 2 + faulty.len(), Duration::from_secs(20))?;
    // The vanishing hosts must be in the middle of a stream when they go.
    for island in &faulty[2..] {
        wait_received(&island.client, MIB)?;
    }
    let link_gone = islands[0].remove_link(&fx.topo)?;
    let ns_gone = islands[1].delete_namespace(&fx.topo)?;
    let mut closed = Vec::new();
    for fault in faulty {
        let ended = wait_end(&fault, &fx)?;
        let began = match fault.name {
            "reset" => {
                fx.upstream
                    .ledger
                    .wait_for(reset_seed, Duration::from_secs(5))?
                    .ended
            }
            "zero window" => fx
                .upstream
                .ledger
                .mark_of(stall_seed)
                .context("the stalling upstream never stopped reading")?,
            "link removed" => link_gone,
            _ => ns_gone,
        };
        closed.push((
            fault.name,
            fault.local,
            ended.saturating_duration_since(began),
        ));
    }
    let events = fx.wait_audit("session_close", closed.len(), Duration::from_secs(20))?;
    let mut gone_ids = BTreeSet::new();
    for (name, local, took) in &closed {
        let event = events
            .iter()
            .find(|e| e["source"] == local.to_string())
            .with_context(|| format!("{name}: no session_close for {local} in {events:#?}"))?;
        case.figure(
            &format!("{datapath} {name}"),
            format!(
                "client saw the close {} after the fault; audit: {} ({})",
                ms(*took),
                event["reason"],
                event["detail"]
            ),
        );
        ensure!(
            event["reason"] == "upstream_closed"
                && event["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("upstream")),
            "{name}: the audit must say the upstream ended it, and how: {event}"
        );
        gone_ids.insert(event["session_id"].as_str().unwrap_or_default().to_owned());
    }
    check_only_streams_left(&fx, &gone_ids, streams.len())?;
    let moved = streams.finish(&fx)?;
    case.figure(
        &format!("{datapath} legitimate streams"),
        super::mode::mib(moved),
    );
    fx.wait_idle()
}

fn wait_received(client: &EchoClient, bytes: u64) -> Result<()> {
    Ok(tcpgate_tests::eventually(
        Duration::from_secs(20),
        "an echo stream to get going",
        || {
            client
                .received_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                >= bytes
        },
    )?)
}

/// Waits (bounded) for the faulty client to see its connection end; the
/// instant it did.
fn wait_end(fault: &Faulty, fx: &Fixture) -> Result<Instant> {
    // The client records the instant itself: the poll's pace does not
    // blur it.
    tcpgate_tests::eventually(CLOSE_BOUND, "the client to see its end", || {
        fault.client.ended_at()
    })
    .with_context(|| {
        format!(
            "{}: the client still waits after the fault (it hangs)\n{}",
            fault.name,
            fx.agent.logs_tail(20)
        )
    })
}

/// The faulty sessions left no trace: the operator endpoint lists only the
/// legitimate streams, and on the kernel path the pinned maps (bpftool)
/// hold exactly their entries.
fn check_only_streams_left(fx: &Fixture, gone: &BTreeSet<String>, live: usize) -> Result<()> {
    let mut state = String::new();
    tcpgate_tests::eventually(Duration::from_secs(10), "only the legitimate streams left", || -> Result<bool> {
        let listed = fx.live_sessions()?;
        let ids: BTreeSet<String> = listed
            .iter()
            .filter_map(|s| s["session_id"].as_str().map(str::to_owned))
            .collect();
        let (sessions, sockets) = if fx.is_ebpf() {
            (fx.map_len("sessions")?, fx.map_len("sockets")?)
        } else {
            (live, 2 * live)
        };
        let gauge = fx.sessions_live_gauge()?;
        state = format!(
            "after the faults: {} sessions listed ({ids:?}, ended: {gone:?}), {sessions} in the sessions map, \
             {sockets} in the sockets map, gauge {gauge}; only the {live} legitimate streams should be left",
            ids.len()
        );
        Ok(ids.len() == live
            && ids.is_disjoint(gone)
            && sessions == live
            && sockets == 2 * live
            && gauge == live as f64)
    })
    .with_context(|| state.clone())
}
