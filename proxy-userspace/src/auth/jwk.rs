//! One key of a JWKS document: whether it can verify tokens here, and as
//! what. A key that cannot is skipped with its [`KeyError`].

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::jwks::{ALLOWED_ALGORITHMS, VerifyKey};

/// Why one key of a JWKS document is skipped.
#[derive(Debug, thiserror::Error)]
pub(super) enum KeyError {
    #[error(transparent)]
    Parse(serde_json::Error),
    #[error("key is not for signatures (`use` is not `sig`)")]
    NotForSignatures,
    #[error("unsupported EC curve {0:?}")]
    EcCurve(EllipticCurve),
    #[error("unsupported OKP curve {0:?}")]
    OkpCurve(EllipticCurve),
    #[error("symmetric (oct) keys are not accepted from a JWKS")]
    Symmetric,
    #[error("unsupported key type")]
    KeyType,
    #[error("algorithm {0} is not a signature algorithm")]
    NotSignature(String),
    #[error("algorithm {0:?} does not fit the key type")]
    AlgorithmMismatch(Algorithm),
    #[error("algorithm {0:?} is not allowed")]
    NotAllowed(Algorithm),
    #[error("bad key material")]
    Material(#[source] jsonwebtoken::errors::Error),
}

pub(super) fn verify_key(jwk: &Jwk) -> Result<VerifyKey, KeyError> {
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Err(KeyError::NotForSignatures);
    }
    let derived = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref other => return Err(KeyError::EcCurve(other.clone())),
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            return Err(KeyError::OkpCurve(p.curve.clone()));
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err(KeyError::Symmetric);
        }
        _ => return Err(KeyError::KeyType),
    };
    let alg = match jwk.common.key_algorithm {
        None => derived,
        Some(ka) => {
            let alg = ka
                .to_string()
                .parse::<Algorithm>()
                .map_err(|_| KeyError::NotSignature(ka.to_string()))?;
            if alg.family() != derived.family() || (derived != Algorithm::RS256 && alg != derived) {
                return Err(KeyError::AlgorithmMismatch(alg));
            }
            alg
        }
    };
    if !ALLOWED_ALGORITHMS.contains(&alg) {
        return Err(KeyError::NotAllowed(alg));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(KeyError::Material)?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}
