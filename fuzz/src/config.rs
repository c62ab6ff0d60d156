//! `config`: arbitrary text through `Config::from_toml`, the whole agent
//! configuration as the agent reads it.
//!
//! An accepted config must re-validate with no errors (agent sections,
//! `[auth]` with `[[policy]]`, interception), and a rejected one must say
//! why: a parse message, or field errors that each name a field and a
//! problem.

use std::path::Path;

use tcpgate::auth::Policy;
use tcpgate::config::{Config, ConfigError};

pub fn check(data: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(data) else {
        return "not UTF-8".to_owned();
    };
    let path = Path::new("fuzz.toml");
    match Config::from_toml(text, path) {
        Ok(config) => {
            assert_eq!(config.validate(), vec![], "an accepted config re-validates");
            if let Some(auth) = &config.auth {
                assert_eq!(
                    tcpgate::auth::validate_all(auth, &config.policy),
                    vec![],
                    "accepted [auth] and [[policy]] re-validate"
                );
                let policy = Policy::from_config(&config.policy, auth)
                    .expect("an accepted policy compiles again");
                assert_eq!(
                    policy.check_within(&config.reachable_destinations()),
                    vec![],
                    "accepted rules stay inside the reachable destinations"
                );
            }
            if let Some(section) = &config.intercept {
                let mut errors = Vec::new();
                let again = section.resolve(&mut errors);
                assert_eq!(errors, vec![], "accepted interception re-resolves");
                assert_eq!(again, config.intercept_set, "resolving is deterministic");
            }
            "ok".to_owned()
        }
        Err(ConfigError::Parse { path: p, message }) => {
            assert_eq!(p, path);
            assert!(
                !message.trim().is_empty(),
                "a parse error says what is wrong"
            );
            "parse error".to_owned()
        }
        Err(ConfigError::Invalid { path: p, errors }) => {
            assert_eq!(p, path);
            assert!(!errors.is_empty(), "an invalid config lists its errors");
            for e in &errors {
                assert!(!e.path.is_empty() && !e.message.is_empty(), "{e:?}");
            }
            let fields: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
            format!("invalid: {}", fields.join(", "))
        }
        Err(other) => panic!("from_toml does no I/O, yet failed with {other}"),
    }
}
