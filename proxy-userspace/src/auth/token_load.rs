//! Loading one `[[auth.issuer]]` at startup: its keys (file, URL or OIDC
//! discovery, the failures of which are counted) and its HS256 secret.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use prometheus_client::metrics::counter::Counter;

use super::config::IssuerConfig;
use super::jwks::{JwksSource, KeyCache, KeySet, error_chain};
use super::token::LoadError;

/// One issuer's keys and settings, as the validator uses them.
pub(super) struct IssuerState {
    pub(super) audience: String,
    pub(super) keys: Option<Arc<KeyCache>>,
    pub(super) refresh_interval: Duration,
    pub(super) hs256: Option<DecodingKey>,
}

pub(super) async fn load_issuer(
    index: usize,
    ic: &IssuerConfig,
    failures: Counter,
) -> Result<IssuerState, LoadError> {
    let keys_err = |source| LoadError::Keys { index, source };
    let min = ic
        .min_refresh_interval
        .get()
        .unwrap_or(super::config::DEFAULT_MIN_REFRESH_INTERVAL);
    let keys = if let Some(path) = &ic.jwks_file {
        let source = JwksSource::File(path.clone());
        let initial = source.fetch().await.map_err(keys_err)?;
        Some(Arc::new(KeyCache::new(source, initial, min)))
    } else if ic.jwks_url.is_some() || ic.hs256_secret_file.is_none() {
        // An explicit jwks_url wins; without one, OIDC discovery.
        let source = match &ic.jwks_url {
            Some(url) => JwksSource::url(url, ic.ca_file.as_deref()),
            None => JwksSource::discovery(&ic.issuer, ic.ca_file.as_deref()),
        }
        .map_err(keys_err)?;
        let (initial, error) = match source.fetch().await {
            Ok(set) => (set, None),
            Err(e) => {
                failures.inc();
                let error = error_chain(&e);
                tracing::warn!(issuer = %ic.issuer, error = %error,
                    "cannot fetch keys at startup; starting without keys and retrying on demand");
                (KeySet::default(), Some(error))
            }
        };
        let cache = KeyCache::new(source, initial, min).counting_failures(failures);
        cache.set_last_error(error);
        Some(Arc::new(cache))
    } else {
        None
    };
    let hs256 = match &ic.hs256_secret_file {
        None => None,
        Some(path) => {
            tracing::warn!(issuer = %ic.issuer, "HS256 with a shared secret is enabled for this issuer: development only");
            Some(DecodingKey::from_secret(&read_secret(index, path)?))
        }
    };
    Ok(IssuerState {
        audience: ic.audience.clone(),
        keys,
        refresh_interval: ic
            .refresh_interval
            .get()
            .unwrap_or(super::config::DEFAULT_REFRESH_INTERVAL),
        hs256,
    })
}

fn read_secret(index: usize, path: &Path) -> Result<Vec<u8>, LoadError> {
    super::config::read_hs256_secret(path).map_err(|source| LoadError::Secret { index, source })
}
