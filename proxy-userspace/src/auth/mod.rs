//! Authentication and authorization: no connection reaches a private
//! service without a valid short-lived token, and access ends when the
//! token's grant ends.
//!
//! - [`config`]: the `[auth]` and `[[policy]]` config sections and their validation.
//! - [`token`] and [`jwks`]: JWT validation against per-issuer JWKS keys.
//! - [`policy`] (with [`matcher`] and [`destination`]): deny-by-default rules.
//! - [`preamble`]: the in-band token preamble a client sends first.
//! - [`grants`]: live grants, their expiry and revocation events.
//! - [`api_types`] and [`client`]: the grant API wire types and client helpers.

pub mod api_types;
pub mod client;
pub mod config;
pub mod destination;
pub mod grants;
pub mod jwks;
pub mod matcher;
pub mod policy;
pub mod preamble;
pub mod token;

pub use config::{AuthConfig, FieldError, IssuerConfig, RuleConfig, validate_all};
pub use destination::{Destination, DestinationSpec, PortRange};
pub use grants::{Grant, GrantEvent, GrantId, GrantKind, GrantStore};
pub use policy::{Decision, Denial, Policy};
pub use token::{TokenError, TokenValidator, ValidatedToken};
