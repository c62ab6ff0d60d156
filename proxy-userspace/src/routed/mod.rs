//! Routed grants (`[intercept.routed_grants]`, opt-in): a granted source's
//! flows are forwarded as plain routing does instead of being terminated.
//!
//! - Two tc programs on the runner-facing interfaces (`intercept.interfaces`):
//!   ingress starts a flow in `FLOWS` at a granted SYN and marks its packets
//!   (the intercept table skips the mark, the guard's forward chain accepts
//!   it); egress counts the return direction. Netlink filters, so they stay
//!   attached, and keep enforcing each flow's deadline, when the agent dies.
//! - [`sources`] keeps `ROUTED_SOURCES` equal to "sources with exactly one
//!   live source grant", each with its grant's destinations and expiry.
//! - [`flows`] learns of flows from the programs' [`events`] ring (and reads
//!   `FLOWS` whole now and then): audit lines, expiry and revocation (RSTs
//!   both ways from [`rst`], with the sequence numbers the programs tracked).
//! - [`edits`] runs two never-attached programs that end and remove a
//!   flow's entry only while it is still that flow (a runner may reuse the
//!   4-tuple at any moment).
//!
//! Only IPv4 over Ethernet: anything else takes the intercepting path.

pub mod edits;
mod ending;
pub mod events;
pub mod flows;
pub mod handover;
mod known;
pub mod metrics;
pub mod rst;
pub mod sources;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::tc::{self, NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use proxy_common::routed::{FlowKey, FlowValue, RoutedConfig, RoutedSource, RoutedStats};
use proxy_common::{map_names, program_names};

use crate::bpf::{BpfError, LoadedBpf, typed};
use crate::config::RoutedGrantsSection;

/// `FLOWS`' pin in the agent's pin directory.
pub const FLOWS_PIN: &str = crate::pinned::FLOWS_PIN;

/// tc filter priority of both programs: before filters at the default.
const TC_PRIORITY: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RoutedError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("cannot write the routed mark into ROUTED_CONFIG")]
    Config(#[source] aya::maps::MapError),
    #[error("cannot add the clsact qdisc on {interface} (intercept.interfaces)")]
    Qdisc {
        interface: String,
        #[source]
        source: tc::TcError,
    },
    #[error(transparent)]
    Edit(#[from] edits::EditError),
    #[error("cannot attach {program} to {interface} (intercept.interfaces)")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// The installed routed path, live until [`Router::shutdown`].
pub struct Router {
    pub(crate) flows: Mutex<HashMap<MapData, FlowKey, FlowValue>>,
    /// Ends and removes flows in `FLOWS` (never one a new SYN replaced).
    pub(crate) edits: edits::FlowEdits,
    pub(crate) sources: Mutex<HashMap<MapData, [u8; 4], RoutedSource>>,
    /// `FLOW_EVENTS`, until the flow watch takes it.
    events: Mutex<Option<RingBuf<MapData>>>,
    stats: PerCpuArray<MapData, RoutedStats>,
    pub(crate) section: RoutedGrantsSection,
    interfaces: Vec<String>,
    flows_pin: PathBuf,
    /// [`sources::clock_offset`] at start.
    offset: u64,
    /// Flows a previous agent opened, carried over at start (their audit
    /// lines say `handover: adopted`); taken by the flow watch.
    carried: Mutex<HashSet<FlowKey>>,
    /// A successor took this agent over: its programs track the flows now.
    handed_over: AtomicBool,
}

impl Router {
    /// Writes the mark, pins `FLOWS` and attaches both programs to every
    /// interface, replacing a previous agent's filters.
    /// `previous`: the pinned `FLOWS` a previous agent left (see
    /// [`handover`]), opened before the stale pins were removed.
    pub fn start(
        bpf: &mut LoadedBpf,
        section: &RoutedGrantsSection,
        interfaces: &[String],
        previous: Option<handover::Previous>,
    ) -> Result<Self, RoutedError> {
        let mut config: Array<MapData, RoutedConfig> = typed(
            map_names::ROUTED_CONFIG,
            bpf.take_map(map_names::ROUTED_CONFIG)?,
        )?;
        let value = RoutedConfig {
            mark: section.mark,
            _pad: 0,
        };
        config.set(0, value, 0).map_err(RoutedError::Config)?;
        let flows_pin = bpf.pin_dir.join(FLOWS_PIN);
        bpf.pin_map(map_names::FLOWS, FLOWS_PIN)?;
        let mut flows: HashMap<MapData, FlowKey, FlowValue> =
            typed(map_names::FLOWS, bpf.take_map(map_names::FLOWS)?)?;
        let mut carried = previous
            .as_ref()
            .map(|p| p.carry(&mut flows))
            .unwrap_or_default();
        let edits = edits::FlowEdits::load(bpf)?;
        let router = Self {
            flows: Mutex::new(flows),
            edits,
            sources: Mutex::new(typed(
                map_names::ROUTED_SOURCES,
                bpf.take_map(map_names::ROUTED_SOURCES)?,
            )?),
            events: Mutex::new(Some(typed(
                map_names::FLOW_EVENTS,
                bpf.take_map(map_names::FLOW_EVENTS)?,
            )?)),
            stats: typed(
                map_names::ROUTED_STATS,
                bpf.take_map(map_names::ROUTED_STATS)?,
            )?,
            section: section.clone(),
            interfaces: interfaces.to_vec(),
            flows_pin,
            offset: sources::clock_offset(),
            carried: Mutex::new(HashSet::new()),
            handed_over: AtomicBool::new(false),
        };
        for (name, attach_type) in [
            (program_names::ROUTED_IN, TcAttachType::Ingress),
            (program_names::ROUTED_OUT, TcAttachType::Egress),
        ] {
            let program = bpf.load_program(name, SchedClassifier::load)?;
            for interface in interfaces {
                attach(program, name, interface, attach_type)?;
            }
        }
        if let Some(previous) = previous {
            // Flows the old programs opened while ours were being attached.
            carried.extend(
                previous.carry(&mut router.flows.lock().unwrap_or_else(PoisonError::into_inner)),
            );
            tracing::info!(
                flows = carried.len(),
                "routed flows of the previous agent carried over"
            );
        }
        *router
            .carried
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = carried;
        Ok(router)
    }

    /// Whether `key` is a flow a previous agent opened (asked once per flow).
    pub(crate) fn take_carried(&self, key: &FlowKey) -> bool {
        self.carried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
    }

    /// The programs' event ring, for the one flow watch.
    pub(crate) fn take_events(&self) -> Option<events::FlowEvents> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .map(events::FlowEvents::new)
    }

    /// A successor took over: its programs and `FLOWS` track the flows from
    /// now on, so this agent neither ends nor reports them any more.
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Release);
    }

    #[must_use]
    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// The programs' counters, summed over the CPUs.
    #[must_use]
    pub fn stats(&self) -> RoutedStats {
        let mut total = RoutedStats::default();
        if let Ok(per_cpu) = self.stats.get(&0, 0) {
            for s in per_cpu.iter() {
                total.flows_opened += s.flows_opened;
                total.flows_full += s.flows_full;
                total.forged_marks += s.forged_marks;
                total.dropped += s.dropped;
                total.preambles += s.preambles;
                total.events_lost += s.events_lost;
            }
        }
        total
    }

    /// Detaches the programs and removes the pin (after [`flows::FlowWatch`]
    /// ended every flow):
    /// packets of any flow left go to the intercepting path, which refuses
    /// them.
    pub fn shutdown(&self) {
        for interface in &self.interfaces {
            for (name, attach_type) in [
                (program_names::ROUTED_IN, TcAttachType::Ingress),
                (program_names::ROUTED_OUT, TcAttachType::Egress),
            ] {
                if let Err(e) = tc::qdisc_detach_program(interface, attach_type, name) {
                    tracing::warn!(interface, program = name, error = %e, "cannot detach a routed program");
                }
            }
        }
        let _ = std::fs::remove_file(&self.flows_pin);
    }
}

/// Attaches `program` as a netlink filter (it outlives the agent), after
/// removing any filter of the same name a previous agent left.
fn attach(
    program: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<(), RoutedError> {
    if let Err(source) = tc::qdisc_add_clsact(interface) {
        let exists = match &source {
            tc::TcError::AlreadyAttached => true,
            tc::TcError::NetlinkError(e) => e.raw_os_error() == Some(libc::EEXIST),
            _ => false,
        };
        if !exists {
            return Err(RoutedError::Qdisc {
                interface: interface.to_owned(),
                source,
            });
        }
    }
    let _ = tc::qdisc_detach_program(interface, attach_type, name);
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: TC_PRIORITY,
        ..NlOptions::default()
    });
    let attach_error = |source| RoutedError::Attach {
        program: name,
        interface: interface.to_owned(),
        source,
    };
    let id = program
        .attach_with_options(interface, attach_type, options)
        .map_err(attach_error)?;
    let link = program.take_link(id).map_err(attach_error)?;
    // Dropping the link would remove the filter; it stays until
    // `Router::shutdown` or a successor replaces it.
    std::mem::forget(link);
    Ok(())
}
