//! A fleet of bastions sharing grants and revocations through etcd.
//!
//! A source grant issued through any bastion is stored in etcd (on a lease
//! whose TTL is its lifetime) before the API answers 201; every bastion
//! installs it from its watch. A revocation is a record living until the
//! latest `exp` it covers; every bastion applies it. The watch resumes
//! from the last revision applied; a compacted revision means a full
//! reload. See [`record`] for the key layout and [`sync`] for the rules.
//!
//! Without `[cluster]` none of this runs: grants stay in the one agent.

mod health;
pub mod record;
mod sync;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, PutOptions, TlsOptions, Txn, TxnOp,
};

pub use health::{Applied, Health};
use record::{GRANTS, GrantRecord, REVOCATIONS, RevocationRecord, ttl_until};

use crate::auth::{Grant, GrantId};
use crate::config::ClusterSection;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot set up the etcd client for {urls}")]
    Client {
        urls: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("cannot read {field} {}", path.display())]
    TlsFile {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd did not answer within {0:?} ([cluster] timeout)")]
    Timeout(Duration),
    #[error("the request to etcd failed")]
    Etcd(#[source] etcd_client::Error),
    #[error("the watch on the fleet's records ended: {0}")]
    WatchEnded(String),
    #[error("revision {wanted} was compacted (oldest kept: {compacted}); reloading everything")]
    Compacted { wanted: i64, compacted: i64 },
}

/// This bastion's handle on the fleet's store. Cheap to share.
pub struct Cluster {
    client: Client,
    /// `[cluster] etcd`, for log lines that say which store is meant.
    urls: String,
    prefix: String,
    name: String,
    timeout: Duration,
    /// One client per member, for retrying a write on each in turn: the
    /// balanced client keeps choosing a member that died (its connection
    /// fails at once, so it looks least loaded), so retries through it
    /// alone can all fail while the other members are fine.
    members: Vec<Client>,
    health: Health,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// TLS to etcd when `[cluster] ca` is set: trust only that CA, and show
/// `cert` when given (the files were checked with the configuration).
fn tls_options(section: &ClusterSection) -> Result<Option<TlsOptions>, ClusterError> {
    let Some(ca) = &section.ca else {
        return Ok(None);
    };
    let read = |field: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| ClusterError::TlsFile {
            field,
            path: path.to_owned(),
            source,
        })
    };
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("cluster.ca", ca)?));
    if let (Some(cert), Some(key)) = (&section.cert, &section.key) {
        tls = tls.identity(Identity::from_pem(
            read("cluster.cert", cert)?,
            read("cluster.key", key)?,
        ));
    }
    Ok(Some(tls))
}

impl Cluster {
    /// Sets up the client; nothing is sent yet (requests connect lazily,
    /// to whichever member answers).
    pub async fn connect(section: &ClusterSection) -> Result<Self, ClusterError> {
        // HTTP/2 pings notice a member that vanished (a cut link sends no
        // reset) within about two timeouts.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(section.timeout)
            .with_timeout(section.timeout)
            .with_keep_alive(section.timeout, section.timeout)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls_options(section)? {
            // tonic builds its rustls configuration from the process
            // default provider; make sure it is ours (aws-lc-rs).
            crate::install_crypto_provider();
            options = options.with_tls(tls);
        }
        let urls = section.etcd.join(", ");
        let connect = |urls: &[String]| Client::connect(urls.to_vec(), Some(options.clone()));
        let failed = |source| ClusterError::Client {
            urls: urls.clone(),
            source,
        };
        let client = connect(&section.etcd).await.map_err(failed)?;
        let mut members = Vec::with_capacity(section.etcd.len());
        for url in &section.etcd {
            members.push(connect(std::slice::from_ref(url)).await.map_err(failed)?);
        }
        Ok(Self {
            client,
            urls,
            prefix: section.prefix.clone(),
            name: section.name.clone(),
            timeout: section.timeout,
            members,
            health: Health::default(),
        })
    }

    /// `[cluster] etcd`, joined.
    #[must_use]
    pub fn urls(&self) -> &str {
        &self.urls
    }

    /// This bastion's name (`[cluster] name`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn health(&self) -> &Health {
        &self.health
    }

    fn grant_key(&self, id: GrantId) -> String {
        format!("{}{GRANTS}{id}", self.prefix)
    }

    /// Runs one etcd request under `[cluster] timeout`.
    async fn bounded<T>(
        &self,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(ClusterError::Etcd(e)),
            Err(_) => Err(ClusterError::Timeout(self.timeout)),
        }
    }

    /// Runs a write through the balanced client, then, while it fails,
    /// once through each member's own; a failure is counted.
    async fn retried<F, Fut>(&self, attempt: F) -> Result<(), ClusterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<(), ClusterError>>,
    {
        let mut result = attempt(self.client.clone()).await;
        for member in &self.members {
            if result.is_ok() {
                break;
            }
            result = attempt(member.clone()).await;
        }
        self.count_failure(result)
    }

    fn count_failure<T>(&self, result: Result<T, ClusterError>) -> Result<T, ClusterError> {
        if result.is_err() {
            self.health.publish_failed();
        }
        result
    }

    /// Stores a source grant for the fleet, on a lease lasting its lifetime.
    pub async fn publish_grant(&self, grant: &Grant) -> Result<(), ClusterError> {
        let Some(record) = GrantRecord::of(grant, &self.name) else {
            return Ok(());
        };
        let record = &record;
        let attempt = |mut client: Client| async move {
            let ttl = ttl_until(grant.expires_at, SystemTime::now());
            let lease = self.bounded(client.lease_grant(ttl, None)).await?;
            let value = serde_json::to_vec(record).unwrap_or_default();
            let options = PutOptions::new().with_lease(lease.id());
            self.bounded(client.put(self.grant_key(grant.id), value, Some(options)))
                .await?;
            Ok(())
        };
        self.retried(attempt).await
    }

    /// Removes a grant its holder gave back.
    pub async fn withdraw_grant(&self, id: GrantId) -> Result<(), ClusterError> {
        let mut client = self.client.clone();
        let result = self
            .bounded(client.delete(self.grant_key(id), None))
            .await
            .map(drop);
        self.count_failure(result)
    }

    /// Stores a revocation (when there is one) and removes the ended
    /// grants' records, in one transaction: every bastion sees the
    /// revocation no later than the grants' end.
    pub async fn publish_revocation(
        &self,
        revocation: Option<&RevocationRecord>,
        ended: &[GrantId],
    ) -> Result<(), ClusterError> {
        let attempt = |mut client: Client| async move {
            let mut ops: Vec<TxnOp> = Vec::new();
            if let Some(revocation) = revocation {
                let ttl = ttl_until(revocation.until(), SystemTime::now());
                let lease = self.bounded(client.lease_grant(ttl, None)).await?;
                let key = format!("{}{REVOCATIONS}{:016x}", self.prefix, rand::random::<u64>());
                let value = serde_json::to_vec(revocation).unwrap_or_default();
                ops.push(TxnOp::put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(lease.id())),
                ));
            }
            ops.extend(
                ended
                    .iter()
                    .map(|id| TxnOp::delete(self.grant_key(*id), None)),
            );
            if !ops.is_empty() {
                self.bounded(client.txn(Txn::new().and_then(ops))).await?;
            }
            Ok(())
        };
        self.retried(attempt).await
    }

    /// Every grant the fleet holds, oldest first (`tcpgate grants --cluster`).
    pub async fn fleet_grants(&self) -> Result<Vec<GrantRecord>, ClusterError> {
        let mut client = self.client.clone();
        let key = format!("{}{GRANTS}", self.prefix);
        let response = self
            .bounded(client.get(key, Some(GetOptions::new().with_prefix())))
            .await?;
        let mut grants: Vec<GrantRecord> = response
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        grants.sort_by_key(|g| (g.created_unix_ms, g.id));
        Ok(grants)
    }
}
