//! Test fixtures for the auth tests: the shared key and token helpers from
//! the test toolkit, plus loading a validator from a TOML snippet.

use tcpgate::auth::{AuthConfig, TokenValidator};
pub use tcpgate_tests::tokens::*;

/// Parses an `[auth]` section (TOML text) and loads a validator from it.
pub async fn validator(auth_toml: &str) -> TokenValidator {
    let config: AuthConfig = toml::from_str(auth_toml).expect("auth config parses");
    TokenValidator::load(&config)
        .await
        .expect("validator loads")
}
