//! Transparent interception: runners dial the real target address and the
//! bastion takes the connection.
//!
//! The intercept table ([`marking`]) marks the packets to take over, from
//! any interface but `lo` and from the bastion's own processes whatever
//! source they bound; policy routing ([`routing`]) delivers marked packets
//! locally; the sk_lookup program, attached to the agent's network namespace,
//! steers the SYN to the agent's transparent listener when the destination
//! and port are in the LPM trie. The accepted socket's local address is the
//! original destination: no NAT, no conntrack.
//!
//! Failing closed, in every state of the agent:
//! - the guard table ([`crate::firewall::guard`]) drops the protected
//!   prefixes in the forward path and for local processes; it is installed
//!   first and never removed by the agent;
//! - the sk_lookup link is pinned (`lookup_link` in the pin directory), so
//!   after a crash, when the marks and routes are still in place, intercepted
//!   SYNs are refused by the program (the listener slots empty as the dead
//!   agent's sockets close) rather than answered by a local wildcard
//!   listener; a restarting agent replaces the pin;
//! - a clean stop removes the marks, routes and link: the packets are then
//!   forwarded, and dropped by the guard.

pub mod listener;
pub mod marking;
pub mod routing;
pub use crate::config::trie;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, SockMap};
use aya::programs::SkLookup;
use aya::programs::links::{FdLink, PinnedLink};
use proxy_common::intercept::{InterceptValue, LISTENER_V4, LISTENER_V6};
use proxy_common::{map_names, program_names};
use tokio::net::TcpListener;

use crate::bpf::{BpfError, LoadedBpf, typed};
use crate::config::{InterceptEntry, InterceptSection, InterceptSet};
use crate::datapath::SessionMeta;
use crate::firewall::{FirewallError, NftCommand, guard};
use marking::{Marking, MarkingParams, Pin, RoutedMarking};
pub use routing::RoutingParams;
use routing::{IpCommand, Routing, RoutingError};

/// The sk_lookup link's pin, in the agent's pin directory.
pub const LINK_PIN: &str = "lookup_link";

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
    #[error("cannot register listener {addr} in the LISTENERS map")]
    ListenerMap {
        addr: SocketAddr,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot update the intercept trie")]
    Trie(#[source] aya::maps::MapError),
    #[error(transparent)]
    TrieLimits(#[from] trie::TrieError),
    #[error("cannot open this network namespace")]
    Netns(#[source] std::io::Error),
    #[error("cannot attach the sk_lookup program to this network namespace")]
    Attach(#[source] aya::programs::ProgramError),
    #[error("cannot pin the sk_lookup link at {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up policy routing")]
    Routing(#[from] RoutingError),
    #[error("cannot install the guard table (nftables)")]
    Guard(#[source] FirewallError),
    #[error("cannot update the intercept table (nftables)")]
    Marking(#[source] FirewallError),
}

/// The installed interception, live until [`Interceptor::shutdown`].
pub struct Interceptor {
    routing: Routing,
    marking: Marking,
    trie: Mutex<LpmTrie<MapData, [u8; 16], InterceptValue>>,
    _listener_map: SockMap<MapData>,
    set: RwLock<Arc<InterceptSet>>,
    /// Marks and `intercept.interfaces` (None: all but loopback).
    params: RwLock<MarkingParams>,
    /// Live sessions kept marked after a reload took their prefix out.
    pins: Mutex<HashMap<u64, Pin>>,
    /// Kept so the link outlives a crash; removed on a clean stop.
    link_pin: PathBuf,
    /// A successor took over: the tables are its own now.
    handed_over: std::sync::atomic::AtomicBool,
}

/// What a predecessor hands over on a takeover; empty on a fresh start.
#[derive(Debug, Default)]
pub struct Inherit {
    /// Its transparent listeners: accepting goes on on the same sockets
    /// (their queued SYNs included) instead of new ones.
    pub listeners: Vec<std::net::TcpListener>,
    /// Its routing rules and routes, when they are exactly ours: kept as
    /// they are, since removing and re-adding them would stop delivering
    /// its live sessions' packets for a moment.
    pub routing: Option<RoutingParams>,
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct ReloadReport {
    pub prefixes: usize,
    /// Prefixes the guard table drops.
    pub protected: usize,
    /// Live sessions kept on a prefix the reload removed.
    pub sessions_pinned: usize,
}

impl Interceptor {
    /// Installs the guard table, cleans up after a crashed predecessor,
    /// then installs interception. Returns the listeners to accept on.
    pub fn start(
        bpf: &mut LoadedBpf,
        section: &InterceptSection,
        set: InterceptSet,
        upstream_mark: u32,
        mut inherit: Inherit,
    ) -> Result<(Self, Vec<TcpListener>), InterceptError> {
        // First: whatever fails below, the protected prefixes stay dropped.
        guard::install(
            &NftCommand,
            &guard::Guard::new(&set, upstream_mark, section.mark)
                .with_routed(section.routed().map(|r| r.mark)),
        )
        .map_err(InterceptError::Guard)?;
        let params = RoutingParams {
            table: section.route_table,
            priority: section.rule_priority,
            mark: upstream_mark,
            intercept_mark: section.mark,
        };
        let routing = Routing::new(Box::new(IpCommand), params);
        let keep_routing = inherit.routing == Some(params);
        let stale = if keep_routing {
            0
        } else {
            routing.remove_all()?
        };
        if stale > 0 && inherit.routing.is_none() {
            tracing::warn!(
                entries = stale,
                "removed routing rules and routes left by a previous agent"
            );
        }
        let mut listener_map: SockMap<MapData> =
            typed(map_names::LISTENERS, bpf.take_map(map_names::LISTENERS)?)?;
        let mut listeners = Vec::new();
        for (slot, addr) in [LISTENER_V4, LISTENER_V6]
            .into_iter()
            .zip(listener::addresses(section.listen_port))
        {
            let inherited = inherit
                .listeners
                .iter()
                .position(|l| l.local_addr().is_ok_and(|a| a == addr))
                .map(|i| inherit.listeners.swap_remove(i));
            let listener = match inherited
                .map_or_else(|| listener::transparent(addr), |l| listener::adopt(l, addr))
            {
                Ok(listener) => listener,
                Err(e) if addr.is_ipv6() => {
                    tracing::warn!(error = %crate::error_chain(&e), "no IPv6 listener; intercepted IPv6 connections are refused");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            listener_map
                .set(slot, &listener, 0)
                .map_err(|source| InterceptError::ListenerMap { addr, source })?;
            listeners.push(listener);
        }
        let trie = typed(map_names::INTERCEPT, bpf.take_map(map_names::INTERCEPT)?)?;
        let interceptor = Self {
            routing,
            marking: Marking::new(Box::new(NftCommand)),
            trie: Mutex::new(trie),
            _listener_map: listener_map,
            set: RwLock::new(Arc::new(InterceptSet::default())),
            params: RwLock::new(MarkingParams {
                mark: section.mark,
                upstream_mark,
                interfaces: section.interfaces.clone(),
                routed: RoutedMarking::of(section),
            }),
            pins: Mutex::default(),
            link_pin: bpf.pin_dir.join(LINK_PIN),
            handed_over: std::sync::atomic::AtomicBool::new(false),
        };
        // The link before the marks and routes: nothing is delivered locally
        // without the program there to steer or refuse it.
        let installed = attach_lookup(bpf, &interceptor.link_pin)
            .and_then(|()| interceptor.apply(set, &[]).map(drop))
            .and_then(|()| {
                if keep_routing {
                    return Ok(());
                }
                interceptor.routing.install().map_err(InterceptError::from)
            });
        if let Err(e) = installed {
            interceptor.shutdown();
            return Err(e);
        }
        Ok((interceptor, listeners))
    }

    /// Where the routing rules and routes live, for a successor to compare.
    #[must_use]
    pub fn routing_params(&self) -> RoutingParams {
        self.routing.params()
    }

    /// The current set's entry for an original destination.
    #[must_use]
    pub fn lookup(&self, destination: SocketAddr) -> Option<InterceptEntry> {
        self.set
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .lookup(destination)
            .cloned()
    }

    /// The intercepted set in force.
    #[must_use]
    pub fn current(&self) -> Arc<InterceptSet> {
        Arc::clone(&self.set.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the configured runner-facing interfaces (applied by the next
    /// [`Interceptor::apply`]).
    pub fn set_interfaces(&self, interfaces: Option<Vec<String>>) {
        self.params
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .interfaces = interfaces;
    }

    /// Switches to `set`: the guard table, the trie, then the intercept
    /// table. Live sessions whose destination leaves the set stay marked
    /// until they end.
    pub fn apply(
        &self,
        set: InterceptSet,
        live: &[SessionMeta],
    ) -> Result<ReloadReport, InterceptError> {
        let entries = trie::entries(&set)?;
        let params = self
            .params
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let guard = guard::Guard::new(&set, params.upstream_mark, params.mark)
            .with_routed(params.routed.map(|r| r.mark));
        let mut report = ReloadReport {
            prefixes: entries.len(),
            protected: guard.protected.len(),
            ..ReloadReport::default()
        };
        // 1. The guard: a prefix leaving the set is still protected until
        //    here, and a new one is before it is intercepted.
        guard::install(&NftCommand, &guard).map_err(InterceptError::Guard)?;
        // 2. The trie: write the new entries, then drop the old ones.
        {
            let mut trie = self.trie.lock().unwrap_or_else(PoisonError::into_inner);
            let new_keys: HashSet<(u32, [u8; 16])> =
                entries.iter().map(|(p, _)| trie::key(*p)).collect();
            for (prefix, value) in &entries {
                let (bits, addr) = trie::key(*prefix);
                trie.insert(&Key::new(bits, addr), value, 0)
                    .map_err(InterceptError::Trie)?;
            }
            let old: Vec<Key<[u8; 16]>> = trie.keys().filter_map(Result::ok).collect();
            for key in old {
                if !new_keys.contains(&(key.prefix_len(), key.data())) {
                    trie.remove(&key).map_err(InterceptError::Trie)?;
                }
            }
        }
        // 3. The marks, pinning live sessions the new set no longer covers,
        //    in one transaction with the new prefixes.
        {
            let mut pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
            for session in live.iter().filter(|s| set.lookup(s.destination).is_none()) {
                if pins.contains_key(&session.id) {
                    continue;
                }
                pins.insert(
                    session.id,
                    Pin {
                        client: session.client,
                        destination: session.destination,
                    },
                );
                report.sessions_pinned += 1;
            }
            let pinned: Vec<Pin> = pins.values().copied().collect();
            self.marking
                .install(&set, &params, &pinned)
                .map_err(InterceptError::Marking)?;
        }
        *self.set.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(report)
    }

    /// Stops marking a session a reload pinned, if any.
    /// A successor took over: its intercept table replaced this agent's,
    /// so sessions ending here no longer change it.
    pub fn hand_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn session_ended(&self, session_id: u64) {
        if self.handed_over.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let pin = self
            .pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session_id);
        if let Some(pin) = pin
            && let Err(e) = self.marking.unpin(pin)
        {
            tracing::warn!(error = %crate::error_chain(&e), "cannot unpin a session's intercept mark");
        }
    }

    /// Removes the routes and rules, the intercept table and the link pin,
    /// in that order; the guard table stays, so intercepted prefixes are
    /// dropped until an agent is back.
    pub fn shutdown(&self) {
        match self.routing.remove_all() {
            Ok(n) => tracing::debug!(entries = n, "interception routing removed"),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot remove interception routing")
            }
        }
        if let Err(e) = self.marking.remove() {
            tracing::error!(error = %crate::error_chain(&e), "cannot remove the intercept table");
        }
        match std::fs::remove_file(&self.link_pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %self.link_pin.display(), error = %e, "cannot unpin the sk_lookup link")
            }
        }
    }
}

/// Loads and attaches the sk_lookup program, and pins its link at `pin`,
/// replacing a crashed predecessor's in one step (a rename), so the
/// namespace is never without a program that refuses intercepted SYNs.
fn attach_lookup(bpf: &mut LoadedBpf, pin: &Path) -> Result<(), InterceptError> {
    let program = bpf.load_program(program_names::LOOKUP, SkLookup::load)?;
    let netns = std::fs::File::open("/proc/self/ns/net").map_err(InterceptError::Netns)?;
    let id = program.attach(netns).map_err(InterceptError::Attach)?;
    let link = FdLink::from(program.take_link(id).map_err(InterceptError::Attach)?);
    // bpffs refuses names with a dot.
    let fresh = pin.with_file_name(format!("{LINK_PIN}_new"));
    let pin_error = |source| InterceptError::PinLink {
        path: pin.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(&fresh);
    let pinned: PinnedLink = link
        .pin(&fresh)
        .map_err(|e| pin_error(std::io::Error::other(e)))?;
    std::fs::rename(&fresh, pin).map_err(pin_error)?;
    // The pin keeps the link attached; the fd may close.
    drop(pinned);
    Ok(())
}
