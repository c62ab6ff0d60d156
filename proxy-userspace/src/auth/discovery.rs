//! OIDC discovery: an issuer configured with only its `issuer` URL has its
//! keys found through `<issuer>/.well-known/openid-configuration`.
//!
//! The document must name exactly the configured issuer (OpenID Connect
//! Discovery §4.3): a document for another issuer, served by mistake or by
//! someone who controls that path, is refused and none of its keys are used.
//! Both the document and the JWKS it points to are fetched again on every
//! refresh, so a moved `jwks_uri` is followed on the existing schedule.

use serde::Deserialize;

use super::jwks::{JwksError, KeySet, fetch_limited};

/// The discovery URL of an issuer: its URL without a trailing slash, plus
/// the well-known path.
#[must_use]
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// The two fields of the provider metadata tcpgate uses.
#[derive(Deserialize)]
struct ProviderMetadata {
    issuer: String,
    jwks_uri: String,
}

/// Fetches the discovery document at `url`, checks it names `issuer`, and
/// fetches the key set at its `jwks_uri`.
pub(super) async fn fetch_keys(
    client: &reqwest::Client,
    issuer: &str,
    url: &str,
) -> Result<KeySet, JwksError> {
    let body = fetch_limited(client, url).await?;
    let doc: ProviderMetadata =
        serde_json::from_slice(&body).map_err(|source| JwksError::DiscoveryJson {
            url: url.to_owned(),
            source,
        })?;
    if doc.issuer != issuer {
        return Err(JwksError::IssuerMismatch {
            url: url.to_owned(),
            expected: issuer.to_owned(),
            found: doc.issuer,
        });
    }
    match reqwest::Url::parse(&doc.jwks_uri) {
        Ok(u) if u.scheme() == "https" => {}
        _ => {
            return Err(JwksError::BadJwksUri {
                url: url.to_owned(),
                jwks_uri: doc.jwks_uri,
            });
        }
    }
    KeySet::parse(&fetch_limited(client, &doc.jwks_uri).await?)
}

#[cfg(test)]
mod tests {
    use super::discovery_url;

    #[test]
    fn the_well_known_path_follows_the_issuer_path() {
        assert_eq!(
            discovery_url("https://token.actions.githubusercontent.com"),
            "https://token.actions.githubusercontent.com/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://example.okta.com/oauth2/default/"),
            "https://example.okta.com/oauth2/default/.well-known/openid-configuration"
        );
    }
}
