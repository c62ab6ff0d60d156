//! Keeping this bastion in step with the fleet. The rules:
//!
//! - On every (re)connection, the live revocations are read and applied
//!   first, so a bastion that was cut off ends revoked sessions before
//!   anything else.
//! - The first time (and after a compaction), grants and revocations are
//!   read whole, in one transaction (one revision); source grants held here
//!   that the fleet no longer has are ended. Otherwise the watch resumes
//!   from the last revision applied, replaying what was missed.
//! - While etcd cannot be reached, grants held here keep admitting until
//!   their own expiry; the grant API refuses new grants (503).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{EventType, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, WatchOptions};
use tokio::sync::watch;

use super::record::{GRANTS, GrantRecord, REVOCATIONS, RevocationRecord, from_unix_ms};
use super::{Applied, Cluster, ClusterError};
use crate::auth::{CreateError, GrantId};
use crate::gate::{Gate, GrantRefused};

/// How often the watch is asked to confirm it is caught up (the lag).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A grant deleted from etcd this close to its expiry is left to the
/// expiry timer, so its sessions end as expired rather than revoked.
const EXPIRY_SLACK: Duration = Duration::from_secs(2);

impl Cluster {
    /// Keeps `gate` in step with the fleet until `stop` changes. Spawn it
    /// once; [`super::Health::wait_synced`] says when the first load is in.
    pub async fn run(self: Arc<Self>, gate: Arc<Gate>, mut stop: watch::Receiver<bool>) {
        // The last revision applied; None: read everything again.
        let mut revision: Option<i64> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = tokio::select! {
                result = self.follow(&gate, &mut revision) => result,
                _ = stop.changed() => return,
            };
            self.health.set_connected(false);
            if let Err(e) = result {
                if matches!(e, ClusterError::Compacted { .. }) {
                    revision = None;
                    tracing::warn!(error = %e, "fleet watch fell behind a compaction");
                    continue;
                }
                // The chain carries the cause: refused, timed out, or a
                // TLS failure (etcd's certificate not from [cluster] ca,
                // or our client certificate refused).
                tracing::warn!(etcd = %self.urls, error = %crate::error_chain(&e), revision, "cannot follow the fleet's etcd; grants held here keep working until they expire, new grants are refused");
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: catch up, then apply the watch's events.
    async fn follow(&self, gate: &Gate, revision: &mut Option<i64>) -> Result<(), ClusterError> {
        let from = match *revision {
            Some(applied) => {
                self.apply_revocations(gate).await?;
                applied
            }
            None => self.load_all(gate).await?,
        };
        *revision = Some(from);
        let mut watcher = self.client.watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from + 1);
        let mut stream = self
            .bounded(watcher.watch(self.prefix.clone(), Some(options)))
            .await?;
        self.health.set_connected(true);
        self.health.mark_synced();
        tracing::info!(
            revision = from,
            "following the fleet's grants and revocations"
        );
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        loop {
            let response = tokio::select! {
                _ = progress.tick() => {
                    stream.request_progress().await.map_err(ClusterError::Etcd)?;
                    continue;
                }
                message = stream.message() => message.map_err(ClusterError::Etcd)?,
            };
            let Some(response) = response else {
                return Err(ClusterError::WatchEnded("etcd closed the stream".into()));
            };
            if response.compact_revision() > 0 {
                return Err(ClusterError::Compacted {
                    wanted: from + 1,
                    compacted: response.compact_revision(),
                });
            }
            if response.canceled() {
                return Err(ClusterError::WatchEnded(
                    response.cancel_reason().to_owned(),
                ));
            }
            if response.events().is_empty() {
                if !response.created()
                    && let Some(header) = response.header()
                {
                    // A progress notification: everything up to here is in.
                    self.health.caught_up(header.revision());
                    *revision = (*revision).max(Some(header.revision()));
                }
                continue;
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => self.apply_put(gate, kv),
                    EventType::Delete => self.apply_delete(gate, kv),
                }
                *revision = (*revision).max(Some(kv.mod_revision()));
                self.health.applied_up_to(kv.mod_revision());
            }
        }
    }

    /// Reads every revocation and grant at one revision and applies them,
    /// revocations first; returns that revision.
    async fn load_all(&self, gate: &Gate) -> Result<i64, ClusterError> {
        let prefix = |kind: &str| format!("{}{kind}", self.prefix);
        let txn = Txn::new().and_then([
            TxnOp::get(prefix(REVOCATIONS), Some(GetOptions::new().with_prefix())),
            TxnOp::get(prefix(GRANTS), Some(GetOptions::new().with_prefix())),
        ]);
        let mut client = self.client.clone();
        let response = self.bounded(client.txn(txn)).await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut reads = response.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let (Some(revocations), Some(grants)) = (reads.next(), reads.next()) else {
            return Err(ClusterError::WatchEnded(
                "etcd answered the full read without both ranges".into(),
            ));
        };
        for kv in revocations.kvs() {
            self.apply_put(gate, kv);
        }
        let mut live: HashSet<GrantId> = HashSet::new();
        for kv in grants.kvs() {
            if let Some(record) = self.parse::<GrantRecord>(kv) {
                live.insert(record.id);
                self.install(gate, record);
            }
        }
        let ended = gate.end_missing(&live, EXPIRY_SLACK);
        for grant in &ended {
            self.health.applied(Applied::GrantEnded);
            tracing::info!(grant = %grant.id, subject = %grant.subject, "grant ended elsewhere in the fleet while this bastion was away");
        }
        self.health.resynced();
        self.health.caught_up(revision);
        tracing::info!(
            revision,
            grants = live.len(),
            revocations = revocations.kvs().len(),
            "loaded the fleet's grants and revocations"
        );
        Ok(revision)
    }

    /// Applies the live revocations (on reconnection, before the watch
    /// replays anything else).
    async fn apply_revocations(&self, gate: &Gate) -> Result<(), ClusterError> {
        let mut client = self.client.clone();
        let key = format!("{}{REVOCATIONS}", self.prefix);
        let response = self
            .bounded(client.get(key, Some(GetOptions::new().with_prefix())))
            .await?;
        for kv in response.kvs() {
            self.apply_put(gate, kv);
        }
        Ok(())
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, kv: &KeyValue) -> Option<T> {
        match serde_json::from_slice(kv.value()) {
            Ok(value) => Some(value),
            Err(e) => {
                self.health.applied(Applied::Rejected);
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "ignoring a fleet record this agent cannot read");
                None
            }
        }
    }

    /// The part of `kv`'s key after `<prefix><kind>`, if it is of that kind.
    fn suffix<'k>(&self, kv: &'k KeyValue, kind: &str) -> Option<&'k str> {
        kv.key_str()
            .ok()?
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(kind)
    }

    fn apply_put(&self, gate: &Gate, kv: &KeyValue) {
        if self.suffix(kv, GRANTS).is_some() {
            if let Some(record) = self.parse::<GrantRecord>(kv) {
                self.install(gate, record);
            }
        } else if self.suffix(kv, REVOCATIONS).is_some()
            && let Some(record) = self.parse::<RevocationRecord>(kv)
        {
            self.revoke(gate, record);
        }
    }

    fn install(&self, gate: &Gate, record: GrantRecord) {
        let (id, bastion) = (record.id, record.bastion.clone());
        match gate.install(record.into_grant()) {
            Ok(true) => {
                self.health.applied(Applied::GrantInstalled);
                tracing::info!(grant = %id, from = %bastion, "grant installed from the fleet");
            }
            Ok(false) => {}
            Err(GrantRefused::Store(CreateError::Revoked)) => {
                tracing::info!(grant = %id, from = %bastion, "fleet grant not installed: its token is revoked here");
            }
            Err(e) => {
                self.health.applied(Applied::Rejected);
                tracing::warn!(grant = %id, from = %bastion, error = %crate::error_chain(&e), "cannot hold a fleet grant here; it does not admit through this bastion");
            }
        }
    }

    fn revoke(&self, gate: &Gate, record: RevocationRecord) {
        match record {
            RevocationRecord::Subject {
                subject,
                holds,
                revoked_unix_ms,
                bastion,
            } => {
                let holds = RevocationRecord::holds(&subject, &holds);
                let ended =
                    gate.revoke_subject_held(&subject, &holds, from_unix_ms(revoked_unix_ms));
                tracing::info!(%subject, from = %bastion, grants = ended.len(), "fleet revocation applied");
            }
            RevocationRecord::Token {
                grant,
                issuer,
                jti,
                until_unix_ms,
                bastion,
            } => {
                gate.deny_token(&issuer, &jti, from_unix_ms(until_unix_ms));
                let ended = gate.end_grant(grant).is_some();
                tracing::info!(%grant, from = %bastion, ended, "fleet revocation of a grant applied");
            }
        }
        self.health.applied(Applied::RevocationApplied);
    }

    /// A grant's record is gone: given back or revoked elsewhere (ended
    /// here too), or its lease ran out (the expiry timer ends it here).
    fn apply_delete(&self, gate: &Gate, kv: &KeyValue) {
        let Some(id) = self
            .suffix(kv, GRANTS)
            .and_then(|s| s.parse::<GrantId>().ok())
        else {
            return;
        };
        let Some(grant) = gate.grant(id) else { return };
        if grant.expires_at <= SystemTime::now() + EXPIRY_SLACK {
            return;
        }
        if gate.end_grant(id).is_some() {
            self.health.applied(Applied::GrantEnded);
            tracing::info!(grant = %id, subject = %grant.subject, "grant ended elsewhere in the fleet");
        }
    }
}
