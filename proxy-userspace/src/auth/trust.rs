//! Which certificates `tcpgate grant --ca FILE` trusts for the grant API.
//!
//! The certificates in FILE are the only roots (as with `curl --cacert`).
//! The normal WebPKI check runs first. One case curl accepts and WebPKI
//! does not: `openssl req -x509` makes a self-signed certificate marked
//! `CA:TRUE`, and a server presenting it as its own certificate fails
//! with `CaUsedAsEndEntity`. When that is the only objection and the
//! presented certificate is byte for byte one of FILE's, it is trusted:
//! the operator handed us exactly this certificate. Its validity period
//! has then been checked already (WebPKI checks it before the CA flag),
//! its name is checked here, and the handshake signature as always.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::ParsedCertificate;
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("the TLS provider cannot be set up")]
    Provider(#[source] tokio_rustls::rustls::Error),
    #[error("cannot read CA file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("CA file {path} holds no PEM certificate")]
    Empty { path: PathBuf },
    #[error("CA file {path}: no usable CA certificate in it")]
    Unusable {
        path: PathBuf,
        #[source]
        source: tokio_rustls::rustls::client::VerifierBuilderError,
    },
}

/// A client TLS config trusting only the certificates in `path`.
pub fn client_config(path: &Path) -> Result<ClientConfig, TrustError> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let verifier = verifier(path, &provider)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TrustError::Provider)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn verifier(
    path: &Path,
    provider: &Arc<tokio_rustls::rustls::crypto::CryptoProvider>,
) -> Result<PinnedOrCa, TrustError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect)
        .map_err(|source| TrustError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TrustError::Empty {
            path: path.to_owned(),
        });
    }
    let mut roots = RootCertStore::empty();
    // A certificate WebPKI cannot use as a root is still matched below.
    let _ = roots.add_parsable_certificates(certs.iter().cloned());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|source| TrustError::Unusable {
            path: path.to_owned(),
            source,
        })?;
    Ok(PinnedOrCa {
        webpki,
        pinned: certs,
    })
}

/// WebPKI over the CA file, plus the self-signed leaf the file holds.
#[derive(Debug)]
struct PinnedOrCa {
    webpki: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

fn is_ca_used_as_end_entity(error: &Error) -> bool {
    match error {
        Error::InvalidCertificate(CertificateError::Other(other)) => matches!(
            other.0.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::CaUsedAsEndEntity)
        ),
        _ => false,
    }
}

impl ServerCertVerifier for PinnedOrCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(e)
                if is_ca_used_as_end_entity(&e)
                    && self
                        .pinned
                        .iter()
                        .any(|c| c.as_ref() == end_entity.as_ref()) =>
            {
                let parsed = ParsedCertificate::try_from(end_entity)?;
                tokio_rustls::rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The certificate problem behind a failed request, if there was one.
pub fn certificate_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a CertificateError> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(Error::InvalidCertificate(cert)) = e.downcast_ref::<Error>() {
            return Some(cert);
        }
        // An io::Error's source() skips the error it wraps: look inside.
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tcpgate_tests::tls::{ca_signed, self_signed};

    use super::*;

    fn check(trust: &Path, leaf: &Path, name: &str, now: UnixTime) -> Result<(), Error> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let verifier = verifier(trust, &provider).expect("verifier");
        let leaf = CertificateDer::from_pem_file(leaf).expect("leaf");
        let name = ServerName::try_from(name.to_owned()).expect("name");
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], now)
            .map(|_| ())
    }

    #[test]
    fn trusts_the_private_ca_and_a_self_signed_leaf_given_as_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signed = ca_signed(dir.path(), "api", &["198.51.100.1"]);
        let own = self_signed(dir.path(), "own", &["198.51.100.1", "bastion.example"]);
        // After making them: a certificate is valid from the second it was made.
        let now = UnixTime::now();
        check(&signed.trust, &signed.cert, "198.51.100.1", now).expect("CA-signed leaf");
        check(&own.trust, &own.cert, "198.51.100.1", now).expect("self-signed, by IP");
        check(&own.trust, &own.cert, "bastion.example", now).expect("self-signed, by name");
    }

    #[test]
    fn the_self_signed_exception_still_checks_issuer_name_and_validity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = self_signed(dir.path(), "own", &["198.51.100.1"]);
        let other = self_signed(dir.path(), "other", &["198.51.100.1"]);
        let signed = ca_signed(dir.path(), "api", &["198.51.100.1"]);
        let now = UnixTime::now();
        // Another self-signed certificate, even for the same name.
        let err = check(&other.trust, &own.cert, "198.51.100.1", now).expect_err("other");
        assert!(is_ca_used_as_end_entity(&err), "{err:?}");
        // The wrong CA for a CA-signed leaf.
        let err = check(&own.trust, &signed.cert, "198.51.100.1", now).expect_err("wrong CA");
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
        // The right certificate for another name.
        let err = check(&own.trust, &own.cert, "198.51.100.9", now).expect_err("name");
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
            ),
            "{err:?}"
        );
        // The right certificate once expired (-days 2): WebPKI's validity
        // check comes before the CA flag, so it is never excused.
        let later = UnixTime::since_unix_epoch(
            Duration::from_secs(now.as_secs()) + Duration::from_secs(3 * 86_400),
        );
        let err = check(&own.trust, &own.cert, "198.51.100.1", later).expect_err("expired");
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
            ),
            "{err:?}"
        );
    }
}
