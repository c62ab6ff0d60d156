//! Tests of the `auth` module (one binary, to keep link time down). None of
//! them need root: keys come from the openssl CLI, servers bind loopback.

mod client;
mod config;
mod discovery;
mod grant_limits;
mod grants;
mod identity;
mod jwks_https;
mod policy;
mod policy_claims;
mod preamble;
mod support;
mod test_server;
mod tokens;
