//! The checks behind tcpgate's fuzz targets. Each `check` takes the raw
//! fuzz input, panics if tcpgate panics or breaks an invariant, and returns
//! a one-line summary of the verdict (what the regression files expect).
//!
//! `proxy-userspace/tests/fuzz_regressions.rs` compiles these same files on
//! stable to replay the committed corpus and regressions in `cargo test`.

pub mod config;
pub mod fixture;
pub mod grant_api_body;
pub mod preamble;
pub mod token_claims;
