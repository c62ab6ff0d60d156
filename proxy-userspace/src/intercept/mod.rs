//! Transparent interception: runners dial the real target address and the
//! bastion takes the connection.
//!
//! Policy routing delivers intercepted prefixes locally (forwarded runner
//! traffic and connections from the bastion itself alike); the sk_lookup
//! program, attached to the agent's network namespace, steers the SYN to the
//! agent's transparent listener when the destination and port are in the
//! LPM trie. The accepted socket's local address is the original
//! destination: no NAT, no conntrack.

pub mod listener;
pub mod routing;
pub mod trie;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, SockMap};
use aya::programs::SkLookup;
use proxy_common::intercept::{InterceptValue, LISTENER_V4, LISTENER_V6};
use proxy_common::{map_names, program_names};
use tokio::net::TcpListener;

use crate::bpf::{BpfError, LoadedBpf, typed};
use crate::config::{InterceptEntry, InterceptSection, InterceptSet};
use crate::datapath::SessionMeta;
use routing::{IpCommand, Routing, RoutingError, RoutingParams, Rule};

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
    #[error("cannot set up policy routing")]
    Routing(#[from] RoutingError),
}

/// The installed interception, live until [`Interceptor::shutdown`].
pub struct Interceptor {
    routing: Routing,
    trie: Mutex<LpmTrie<MapData, [u8; 16], InterceptValue>>,
    _listener_map: SockMap<MapData>,
    set: RwLock<Arc<InterceptSet>>,
    /// `intercept.interfaces` as configured (None: all but loopback).
    interfaces: RwLock<Option<Vec<String>>>,
    prefix_rules: Mutex<HashSet<Rule>>,
    session_rules: Mutex<HashMap<u64, Rule>>,
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct ReloadReport {
    pub prefixes: usize,
    pub rules_added: usize,
    pub rules_removed: usize,
    /// Live sessions kept on a prefix the reload removed.
    pub sessions_pinned: usize,
}

impl Interceptor {
    /// Cleans up after a crashed predecessor, then installs interception.
    /// Returns the listeners to accept on.
    pub fn start(
        bpf: &mut LoadedBpf,
        section: &InterceptSection,
        set: InterceptSet,
        mark: u32,
    ) -> Result<(Self, Vec<TcpListener>), InterceptError> {
        let params = RoutingParams {
            table: section.route_table,
            priority: section.rule_priority,
            mark,
        };
        let routing = Routing::new(Box::new(IpCommand), params);
        let stale = routing.remove_all()?;
        if stale > 0 {
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
            let listener = match listener::transparent(addr) {
                Ok(listener) => listener,
                Err(e) if addr.is_ipv6() => {
                    tracing::warn!(error = %crate::error_chain(&e), "no IPv6 listener; IPv6 interception disabled");
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
            trie: Mutex::new(trie),
            _listener_map: listener_map,
            set: RwLock::new(Arc::new(InterceptSet::default())),
            interfaces: RwLock::new(section.interfaces.clone()),
            prefix_rules: Mutex::default(),
            session_rules: Mutex::default(),
        };
        attach_lookup(bpf)?;
        let installed = interceptor
            .routing
            .install_base()
            .map_err(InterceptError::from)
            .and_then(|()| interceptor.apply(set, &[]).map(drop));
        if let Err(e) = installed {
            interceptor.shutdown();
            return Err(e);
        }
        Ok((interceptor, listeners))
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
        *self
            .interfaces
            .write()
            .unwrap_or_else(PoisonError::into_inner) = interfaces;
    }

    /// Switches to `set`. Live sessions whose destination leaves the set
    /// keep their own routing rule until they end.
    pub fn apply(
        &self,
        set: InterceptSet,
        live: &[SessionMeta],
    ) -> Result<ReloadReport, InterceptError> {
        let entries = trie::entries(&set)?;
        let mut report = ReloadReport {
            prefixes: entries.len(),
            ..ReloadReport::default()
        };
        // 1. Pin live sessions that the new set no longer covers.
        {
            let mut pinned = self
                .session_rules
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for session in live.iter().filter(|s| set.lookup(s.destination).is_none()) {
                if pinned.contains_key(&session.id) {
                    continue;
                }
                let rule = routing::session_rule(
                    session.client,
                    session.destination,
                    self.routing.params(),
                );
                self.routing.add(&rule)?;
                pinned.insert(session.id, rule);
                report.sessions_pinned += 1;
            }
        }
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
        // 3. Routing rules: add before removing, so no prefix kept in both
        //    sets is ever unrouted.
        {
            let configured = self
                .interfaces
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let interfaces = self.routing.interfaces(configured.as_deref())?;
            let wanted: HashSet<Rule> =
                routing::prefix_rules(&set, self.routing.params(), &interfaces)
                    .into_iter()
                    .collect();
            let mut installed = self
                .prefix_rules
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for rule in wanted.difference(&installed.clone()) {
                self.routing.add(rule)?;
                installed.insert(rule.clone());
                report.rules_added += 1;
            }
            for rule in installed.clone().difference(&wanted) {
                self.routing.delete(rule)?;
                installed.remove(rule);
                report.rules_removed += 1;
            }
        }
        *self.set.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(report)
    }

    /// Drops the routing rule a reload pinned for this session, if any.
    pub fn session_ended(&self, session_id: u64) {
        let rule = self
            .session_rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session_id);
        if let Some(rule) = rule
            && let Err(e) = self.routing.delete(&rule)
        {
            tracing::warn!(error = %crate::error_chain(&e), "cannot remove a session's routing rule");
        }
    }

    /// Removes every rule and route. Programs detach when the object drops.
    pub fn shutdown(&self) {
        match self.routing.remove_all() {
            Ok(n) => tracing::debug!(entries = n, "interception routing removed"),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot remove interception routing")
            }
        }
    }
}

fn attach_lookup(bpf: &mut LoadedBpf) -> Result<(), InterceptError> {
    let program: &mut SkLookup = bpf
        .ebpf
        .program_mut(program_names::LOOKUP)
        .ok_or(BpfError::MissingProgram(program_names::LOOKUP))?
        .try_into()
        .map_err(|source| BpfError::Program {
            name: program_names::LOOKUP,
            source,
        })?;
    program.load().map_err(|source| BpfError::Program {
        name: program_names::LOOKUP,
        source,
    })?;
    let netns = std::fs::File::open("/proc/self/ns/net").map_err(InterceptError::Netns)?;
    program.attach(netns).map_err(InterceptError::Attach)?;
    Ok(())
}
