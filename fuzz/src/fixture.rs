//! The fixed world the token and grant targets run in: a current-thread
//! tokio runtime, a [`TokenValidator`] for two issuers (RSA/EC/Ed25519 keys
//! from `fixtures/jwks.json`, and an HS256 dev issuer), and the policy of
//! `fixtures/policy.toml`. Built once per process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tcpgate::auth::{AuthConfig, Policy, RuleConfig, TokenValidator};

pub const GITLAB_ISSUER: &str = "https://gitlab.example.com";
pub const DEV_ISSUER: &str = "https://dev.example.com";

const JWKS: &str = include_str!("../fixtures/jwks.json");
const HS256_SECRET: &str = include_str!("../fixtures/hs256.secret");
const POLICY: &str = include_str!("../fixtures/policy.toml");

/// "Now" for policy decisions, fixed so that a replayed input decides the
/// same way: 2023-11-14T22:13:20Z.
pub fn decision_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// Destinations every decision is tried against: inside and just outside
/// each rule's allow list, IPv4, IPv6 and IPv4-mapped IPv6.
pub fn probe_destinations() -> Vec<SocketAddr> {
    [
        "192.0.2.10:5432",
        "192.0.2.255:5432",
        "192.0.2.10:5433",
        "[2001:db8::1]:22",
        "[2001:db8::ffff]:8099",
        "[2001:db8:0:1::1]:22",
        "198.51.100.1:443",
        "198.51.100.200:65535",
        "203.0.113.10:443",
        "[::ffff:192.0.2.7]:6379",
        "127.0.0.1:5432",
    ]
    .iter()
    .map(|s| {
        s.parse()
            .expect("probe destinations are valid socket addresses")
    })
    .collect()
}

pub struct World {
    pub runtime: tokio::runtime::Runtime,
    pub validator: TokenValidator,
    pub policy: Policy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Sections {
    auth: AuthConfig,
    policy: Vec<RuleConfig>,
}

pub static WORLD: LazyLock<World> = LazyLock::new(build);

fn build() -> World {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime");
    // TokenValidator loads keys and secrets from files: write the fixtures to
    // a private directory, load, and remove it. A later unknown-kid refresh
    // then fails to read the file and keeps the loaded keys, which is one of
    // the paths worth exercising anyway.
    let dir = scratch_dir();
    let jwks = dir.join("jwks.json");
    let secret = dir.join("hs256.secret");
    std::fs::write(&jwks, JWKS).expect("write the JWKS fixture");
    std::fs::write(&secret, HS256_SECRET).expect("write the HS256 fixture");
    let text = POLICY
        .replace("@JWKS@", &jwks.display().to_string())
        .replace("@SECRET@", &secret.display().to_string());
    let sections: Sections = toml::from_str(&text).expect("fixtures/policy.toml parses");
    let validator = runtime
        .block_on(TokenValidator::load(&sections.auth))
        .expect("the fixture validator loads");
    // Best effort: a leftover scratch directory only costs a few bytes.
    let _ = std::fs::remove_dir_all(&dir);
    let policy = Policy::from_config(&sections.policy, &sections.auth)
        .expect("fixtures/policy.toml is a valid policy");
    World {
        runtime,
        validator,
        policy,
    }
}

fn scratch_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("tcpgate-fuzz-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}
