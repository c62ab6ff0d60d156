//! Replays the committed fuzz inputs on stable, in plain `cargo test`:
//!
//! - every file of `fuzz/corpus/<target>/` (the seeds the fuzzers start
//!   from) must pass the target's checks: no panic, no broken invariant;
//! - every input of `fuzz/regressions/<target>/` (a crash the fuzzers found,
//!   minimized) must give exactly the verdict in its `<name>.expected` file.
//!
//! The checks are the very files the fuzz targets call (`fuzz/src/`),
//! compiled into this test, so a fix cannot pass here and fail there.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/config.rs"]
mod config;
#[path = "../../fuzz/src/fixture.rs"]
mod fixture;
#[path = "../../fuzz/src/grant_api_body.rs"]
mod grant_api_body;
#[path = "../../fuzz/src/preamble.rs"]
mod preamble;
#[path = "../../fuzz/src/token_claims.rs"]
mod token_claims;

type Check = fn(&[u8]) -> String;

const EXPECTED_SUFFIX: &str = ".expected";

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The input files of a directory, sorted; `.expected` files and hidden
/// files (`.gitkeep`) are not inputs. A missing directory has none.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            p.is_file()
                && name.is_some_and(|n| !n.starts_with('.') && !n.ends_with(EXPECTED_SUFFIX))
        })
        .collect();
    files.sort();
    files
}

/// Runs `check` on `file`; a panic becomes an error naming the file.
fn run(check: Check, file: &Path) -> Result<String, String> {
    let data = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    catch_unwind(AssertUnwindSafe(|| check(&data))).map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "non-string panic".to_owned());
        format!("{}: panicked: {why}", file.display())
    })
}

fn replay_corpus(target: &str, check: Check) {
    let dir = fuzz_dir().join("corpus").join(target);
    let files = inputs(&dir);
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    let failures: Vec<String> = files.iter().filter_map(|f| run(check, f).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

fn replay_regressions(target: &str, check: Check) {
    let dir = fuzz_dir().join("regressions").join(target);
    let mut failures = Vec::new();
    for file in inputs(&dir) {
        let expected_path = PathBuf::from(format!("{}{EXPECTED_SUFFIX}", file.display()));
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|e| {
            panic!(
                "{} needs its verdict in {}: {e}",
                file.display(),
                expected_path.display()
            )
        });
        match run(check, &file) {
            Ok(got) if got == expected.trim_end() => {}
            Ok(got) => failures.push(format!(
                "{}: got `{got}`, expected `{}`",
                file.display(),
                expected.trim_end()
            )),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The verdict of one named seed: seeds that stop being what they claim
/// (a valid token no longer validating, say) would fuzz much shallower.
fn seed_verdict(target: &str, name: &str, check: Check) -> String {
    run(check, &fuzz_dir().join("corpus").join(target).join(name)).unwrap_or_else(|e| panic!("{e}"))
}

macro_rules! replay_tests {
    ($($target:ident),* $(,)?) => {
        mod corpus {
            $(#[test]
            fn $target() {
                super::replay_corpus(stringify!($target), super::$target::check);
            })*
        }
        mod regressions {
            $(#[test]
            fn $target() {
                super::replay_regressions(stringify!($target), super::$target::check);
            })*
        }
    };
}

replay_tests!(preamble, token_claims, config, grant_api_body);

#[test]
fn token_seeds_reach_the_policy() {
    let v = |name| seed_verdict("token_claims", name, token_claims::check);
    assert_eq!(
        v("rs256-valid.jwt"),
        "token: valid (https://gitlab.example.com); rules [deploy-db, alice-narrow]"
    );
    assert_eq!(
        v("eddsa-valid-feature.jwt"),
        "token: valid (https://gitlab.example.com); rules [literal-glob, alice-narrow]"
    );
    assert_eq!(
        v("hs256-dev-valid.jwt"),
        "token: valid (https://dev.example.com); rules [dev-everything]"
    );
    assert_eq!(v("expired.jwt"), "token: rejected (token_expired)");
    assert_eq!(v("unknown-kid.jwt"), "token: rejected (unknown_kid)");
    assert_eq!(v("alg-none.jwt"), "token: rejected (alg_not_allowed)");
    assert_eq!(v("bad-signature.jwt"), "token: rejected (bad_signature)");
    assert_eq!(
        v("claims-web.json"),
        "claims: rules [web-pipelines, alice-narrow]"
    );
    assert_eq!(v("glob-literal.bin"), "glob: match");
}

#[test]
fn preamble_and_body_seeds_are_what_they_say() {
    let p = |name| seed_verdict("preamble", name, preamble::check);
    assert!(p("request-jwt.bin").starts_with("request: ok ("));
    assert_eq!(
        p("request-truncated-body.bin"),
        "request: need_more; response: oversized"
    );
    assert_eq!(
        p("response-denied.bin"),
        "request: bad_flags; response: ok (41 bytes)"
    );
    let g = |name| seed_verdict("grant_api_body", name, grant_api_body::check);
    assert_eq!(g("narrow.json"), "ok; granted by deploy-db");
    assert_eq!(g("too-wide.json"), "ok; denied");
    assert_eq!(g("zero-lifetime.json"), "bad_request (lifetime)");
    let c = |name| seed_verdict("config", name, config::check);
    assert_eq!(c("intercept.toml"), "ok");
    assert_eq!(
        c("invalid-fields.toml"),
        "invalid: agent.max_sessions, agent.connect_timeout, agent.pin_dir, \
         agent.upstream_mark, forward[0].upstream, forward[1].listen, forward[1].name, \
         admin.token_file, admin.listen"
    );
}
