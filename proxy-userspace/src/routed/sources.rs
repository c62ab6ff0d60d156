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
        let present: HashMap<[u8; 4], RoutedSource> = map.iter().filter_map(Result::ok).collect();
        for (source, record) in &present {
            if wanted.get(source) != Some(record) {
                map.remove(source)?;
            }
        }
        for (source, record) in wanted {
            if present.get(source) != Some(record) {
                map.insert(source, record, 0)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::{GrantId, GrantKind};
    use crate::dest::{Destination, PortRange};

    fn grant(id: u64, source: &str, destinations: &[(&str, u16)], left: Duration) -> Grant {
        let now = SystemTime::now();
        Grant {
            id: GrantId(id),
            kind: GrantKind::Source {
                source: source.parse().expect("address"),
            },
            subject: "s".into(),
            issuer: "i".into(),
            rule: "r".into(),
            created_at: now,
            expires_at: now + left,
            destinations: destinations
                .iter()
                .map(|(prefix, port)| Destination {
                    prefix: prefix.parse().expect("prefix"),
                    ports: vec![PortRange {
                        first: *port,
                        last: *port,
                    }],
                })
                .collect(),
            audit_claims: crate::audit::AuditClaims::default(),
            jti: None,
            token_expires_at: now + left,
        }
    }

    #[test]
    fn only_a_source_with_exactly_one_live_ipv4_grant_is_routed() {
        let hour = Duration::from_secs(3600);
        let grants = [
            grant(1, "198.51.100.2", &[("192.0.2.0/24", 9000)], hour),
            grant(2, "198.51.100.3", &[("192.0.2.10/32", 22)], hour),
            grant(3, "198.51.100.3", &[("192.0.2.10/32", 80)], hour),
            grant(4, "2001:db8:100::2", &[("2001:db8:2::/64", 22)], hour),
            grant(5, "198.51.100.4", &[("192.0.2.0/24", 22)], Duration::ZERO),
        ];
        let offset = clock_offset();
        let wanted = wanted(&grants, SystemTime::now(), offset);
        assert_eq!(wanted.keys().collect::<Vec<_>>(), [&[198, 51, 100, 2]]);
        let record = wanted[&[198, 51, 100, 2]];
        assert_eq!((record.grant_id, record.count), (1, 1));
        assert!(record.destinations[0].covers([192, 0, 2, 77], 9000));
        assert!(!record.destinations[0].covers([192, 0, 2, 77], 9001));
        assert!(!record.destinations[0].covers([192, 0, 3, 1], 9000));
        // The deadline is the grant's expiry on the monotonic clock.
        let left = record.deadline_mono_ns.saturating_sub(monotonic_ns());
        assert!(
            left > 3500 * 1_000_000_000 && left <= 3600 * 1_000_000_000,
            "{left}"
        );
    }

    #[test]
    fn a_grant_too_wide_for_the_record_is_left_to_the_intercepting_path() {
        let many: Vec<(&str, u16)> = (0..=MAX_ROUTED_DESTINATIONS as u16)
            .map(|i| ("192.0.2.0/24", 1000 + i))
            .collect();
        let grants = [grant(1, "198.51.100.2", &many, Duration::from_secs(60))];
        assert!(wanted(&grants, SystemTime::now(), clock_offset()).is_empty());
    }
}
