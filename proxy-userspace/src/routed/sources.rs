//! `ROUTED_SOURCES`: which sources' SYNs the tc program may route. A
//! source is there only while it holds exactly one live source grant (with
//! several, which grant a flow belongs to is the agent's call, so it
//! decides on the intercepting path), only for IPv4, and only when the
//! grant's destinations fit the record.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::PoisonError;
use std::time::SystemTime;

use ipnet::IpNet;
use proxy_common::routed::{MAX_ROUTED_DESTINATIONS, RoutedDestination, RoutedSource};

use super::Router;
use crate::auth::Grant;

/// Now on `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) } != 0 {
        return 0;
    }
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC` in ns, taken once by the agent so a
/// grant's deadline on the monotonic clock is the same on every sync.
#[must_use]
pub fn clock_offset() -> u64 {
    proxy_common::addr::unix_ns(SystemTime::now()).saturating_sub(monotonic_ns())
}

/// The record of each routable source, from the live grants; `offset` is
/// [`clock_offset`].
#[must_use]
pub fn wanted(grants: &[Grant], now: SystemTime, offset: u64) -> HashMap<[u8; 4], RoutedSource> {
    let mut by_source: HashMap<[u8; 4], Vec<&Grant>> = HashMap::new();
    for grant in grants.iter().filter(|g| g.expires_at > now) {
        if let Some(IpAddr::V4(source)) = grant.source().map(|s| s.to_canonical()) {
            by_source.entry(source.octets()).or_default().push(grant);
        }
    }
    by_source
        .into_iter()
        .filter_map(|(source, grants)| match grants.as_slice() {
            [grant] => record(grant, offset).map(|r| (source, r)),
            _ => None,
        })
        .collect()
}

fn record(grant: &Grant, offset: u64) -> Option<RoutedSource> {
    let mut destinations = [RoutedDestination::default(); MAX_ROUTED_DESTINATIONS];
    let mut count = 0;
    for destination in &grant.destinations {
        let IpNet::V4(prefix) = destination.prefix else {
            continue;
        };
        for range in &destination.ports {
            *destinations.get_mut(count)? = RoutedDestination {
                addr: prefix.network().octets(),
                prefix_len: u32::from(prefix.prefix_len()),
                port_first: range.first,
                port_last: range.last,
            };
            count += 1;
        }
    }
    Some(RoutedSource {
        grant_id: grant.id.0,
        deadline_mono_ns: proxy_common::addr::unix_ns(grant.expires_at).saturating_sub(offset),
        count: u32::try_from(count).ok()?,
        _pad: 0,
        destinations,
    })
}

impl Router {
    /// Routes exactly the sources `grants` allow from now on.
    pub fn sync_grants(&self, grants: &[Grant]) {
        let wanted = wanted(grants, SystemTime::now(), self.offset);
        if let Err(e) = self.sync_sources(&wanted) {
            tracing::error!(error = %e, "cannot update ROUTED_SOURCES");
        }
    }

    /// Makes `ROUTED_SOURCES` hold `wanted`: removals first, so a grant
    /// that ended stops admitting before anything else changes.
    pub fn sync_sources(
        &self,
        wanted: &HashMap<[u8; 4], RoutedSource>,
    ) -> Result<(), aya::maps::MapError> {
        let mut map = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let present: Vec<([u8; 4], RoutedSource)> = map.iter().filter_map(Result::ok).collect();
        for (source, record) in &present {
            if wanted.get(source) != Some(record) {
                map.remove(source)?;
            }
        }
        for (source, record) in wanted {
            if !present.iter().any(|(s, r)| s == source && r == record) {
                map.insert(source, record, 0)?;
            }
        }
        Ok(())
    }
}
