//! Authentication and authorization: no connection reaches a private
//! service without a valid short-lived token, and access ends when the
//! token's grant ends.
//!
//! - [`config`]: the `[auth]` and `[[policy]]` config sections and their validation.
//! - [`token`] and [`jwks`]: JWT validation against per-issuer JWKS keys;
//!   [`token_cache`]: verified tokens by their SHA-256, until their `exp`;
//!   [`discovery`]: keys found through OIDC discovery.
//! - [`policy`] (with [`claims`], [`matcher`] and [`destination`]): deny-by-default rules.
//! - [`preamble`]: the in-band token preamble a client sends first.
//! - [`grants`]: live grants, their caps, expiry and revocation events;
//!   [`revocations`]: the deny list that makes revocation stick.
//! - [`limits`]: the `[auth.limits]` bounds.
//! - [`api_types`] and [`client`]: the grant API wire types and client helpers.
//!
//! ## Wiring into the agent
//!
//! 1. Embed [`AuthConfig`] as `auth` and `Vec<RuleConfig>` as `policy` in the
//!    agent config; report [`validate_all`] plus [`Policy::check_within`]
//!    (with the intercepted destinations) as config errors.
//! 2. [`TokenValidator::load`] at startup; spawn
//!    `validator.clone().run_refresh(shutdown)`.
//! 3. `GrantStore::new(auth.audit_claims.clone())`; spawn
//!    `store.clone().run_expiry(shutdown)`; tear sessions down on the
//!    [`GrantEvent`]s from `store.subscribe()` (on `Lagged`, re-check each
//!    session's grant with `store.get`).
//! 4. Per connection (see [`crate::gate`]): first
//!    `store.covering(peer_ip, original_dst, now)`; with a source grant,
//!    wait briefly for the first bytes (server-speaks-first protocols send
//!    nothing) and read anything starting like the magic as a preamble, so
//!    a token never reaches the upstream; otherwise
//!    [`preamble::read_preamble`] with `auth.preamble_timeout()` and the
//!    `[auth.limits]` length cap on the raw socket (never a buffered
//!    reader), `validator.validate`, `store.refuses` (revocations),
//!    `policy.decide`, `store.create(GrantKind::Preamble, ..)`, and answer
//!    with [`preamble::encode_response`].
//! 5. Audit and metrics use the stable [`DenyReason`] of [`TokenError`],
//!    [`Denial`], [`CreateError`] and [`preamble::PreambleError`]
//!    (`deny_reason()`; `reason()` is its string).

pub mod api_types;
pub mod aws;
pub mod claims;
pub mod client;
pub mod config;
pub mod discovery;
/// Destinations are shared with interception; see [`crate::dest`].
pub use crate::dest as destination;
pub mod claims_memo;
pub mod explain;
mod grant_id;
mod grant_table;
pub mod grants;
mod jwk;
pub mod jwks;
mod key_cache;
pub mod limits;
pub mod matcher;
pub mod policy;
pub mod preamble;
mod reason;
pub mod revocations;
pub mod token;
pub mod token_cache;
mod token_load;
pub mod trust;

pub use claims_memo::Verified;
pub use config::{AuthConfig, FieldError, IssuerConfig, RuleConfig, validate_all};
pub use destination::{Destination, DestinationSpec, PortRange};
pub use grants::{CreateError, Grant, GrantEvent, GrantId, GrantKind, GrantLimit, GrantStore};
pub use policy::{Decision, Denial, Policy};
pub use reason::DenyReason;
pub use token::{TokenError, TokenValidator, ValidatedToken};
