//! Case 2: a burst of invalid tokens (unknown `kid`s, garbage signatures,
//! garbage) while legitimate sessions stream. Every invalid one is denied
//! with its reason; valid tokens mixed into the burst are still admitted;
//! and the unknown kids do not hammer the JWKS endpoint: on-demand
//! refreshes stay within one per `min_refresh_interval`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng as _;
use rand::rngs::StdRng;
use tcpgate_tests::tokens::gitlab_claims;

use super::client::echo_roundtrip;
use super::fixture::{Fixture, Options, denial_reasons, denied_metrics};
use super::mode::{Case, ms};
use super::streams::Streams;
use tcpgate_tests::auth_fixture::authenticate;

/// Bytes per second of each legitimate stream.
const STREAM_RATE: u64 = 32 * 1024 * 1024;
/// `min_refresh_interval` in the fixture's config.
const MIN_REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Token {
    /// A well-formed RS256 token signed by nobody, with a random kid.
    UnknownKid,
    /// The issuer's real kid, and a signature of the right size that is noise.
    GarbageSignature,
    /// Not a JWT at all.
    Garbage,
    /// A real token: admitted even in the middle of the burst.
    Valid,
}

fn unsigned(rng: &mut StdRng, kid: &str) -> String {
    let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": kid });
    let signature: Vec<u8> = (0..256).map(|_| rng.random()).collect();
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(gitlab_claims().to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

fn make(fx: &Fixture, rng: &mut StdRng, kind: Token) -> Result<String> {
    Ok(match kind {
        Token::UnknownKid => {
            let kid = format!("kid-{:016x}", rng.random::<u64>());
            unsigned(rng, &kid)
        }
        Token::GarbageSignature => unsigned(rng, "rsa-1"),
        Token::Garbage => {
            let len = rng.random_range(1..600);
            (0..len)
                .map(|_| char::from(rng.random_range(b'!'..=b'~')))
                .collect()
        }
        Token::Valid => fx.token().context("auth fixture")?,
    })
}

pub fn run(case: &mut Case) -> Result<()> {
    let burst = case.scale.pick(300, 1_000);
    // Spread over a few refresh intervals, so the limit is seen to hold
    // across several of them, not only within the first.
    let span = case
        .scale
        .pick(Duration::from_secs(3), Duration::from_secs(5));
    let workers = 8;
    let fx = Fixture::start(Options::ebpf().with_auth())?;
    let auth = fx.auth.as_ref().context("auth")?;
    let streams = Streams::start(&fx, 2, case.rng.random(), Some(STREAM_RATE))?;
    let plan: Vec<(Token, String)> = (0..burst)
        .map(|_| {
            let kind = match case.rng.random_range(0..20) {
                0..=11 => Token::UnknownKid,
                12..=14 => Token::GarbageSignature,
                15..=17 => Token::Garbage,
                _ => Token::Valid,
            };
            make(&fx, &mut case.rng, kind).map(|token| (kind, token))
        })
        .collect::<Result<_>>()?;
    let hits_before = auth.jwks.hits();
    let started = Instant::now();
    let outcomes: Vec<Result<()>> = std::thread::scope(|scope| {
        let chunks: Vec<_> = plan
            .chunks(plan.len().div_ceil(workers))
            .enumerate()
            .map(|(w, chunk)| {
                let fx = &fx;
                scope.spawn(move || -> Result<()> {
                    let pace = span / u32::try_from(chunk.len()).unwrap_or(1);
                    for (i, (kind, token)) in chunk.iter().enumerate() {
                        let at = started + pace * u32::try_from(i).unwrap_or(0);
                        std::thread::sleep(at.saturating_duration_since(Instant::now()));
                        attempt(fx, *kind, token, (w * 100_000 + i) as u64)
                            .with_context(|| format!("{kind:?} token"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        chunks
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
            })
            .collect()
    });
    let took = started.elapsed();
    let hits = auth.jwks.hits();
    outcomes.into_iter().collect::<Result<Vec<()>>>()?;
    let sent = |kind| plan.iter().filter(|(k, _)| *k == kind).count();
    let bound = 1 + (took.as_secs_f64() / MIN_REFRESH.as_secs_f64()).floor() as usize;
    case.figure(
        "burst",
        format!(
            "{burst} connections in {} ({} unknown kid, {} garbage signature, {} garbage, {} valid)",
            ms(took),
            sent(Token::UnknownKid),
            sent(Token::GarbageSignature),
            sent(Token::Garbage),
            sent(Token::Valid)
        ),
    );
    case.figure(
        "JWKS hits",
        format!(
            "{hits} in all, {} during the burst (bound {bound}: 1 + duration / min_refresh_interval)",
            hits - hits_before
        ),
    );
    ensure!(
        hits > hits_before,
        "unknown kids must trigger at least one JWKS refresh"
    );
    ensure!(
        hits - hits_before <= bound,
        "the JWKS endpoint was hit {} times during a {took:?} burst; at most {bound} allowed",
        hits - hits_before
    );
    let invalid = burst - sent(Token::Valid);
    let denied =
        denial_reasons(&fx.wait_audit("connection_denied", invalid, Duration::from_secs(30))?);
    let expected = [
        ("unknown_kid", sent(Token::UnknownKid)),
        ("bad_signature", sent(Token::GarbageSignature)),
        ("malformed_token", sent(Token::Garbage)),
    ];
    ensure!(
        denied
            == expected
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| ((*r).to_owned(), *n))
                .collect(),
        "denials by reason {denied:?}, expected {expected:?}"
    );
    ensure!(
        denied_metrics(&fx.metrics()?) == denied,
        "the metrics disagree with the audit"
    );
    let moved = streams.finish(&fx)?;
    case.figure("legitimate streams", super::mode::mib(moved));
    fx.wait_idle()
}

/// One connection of the burst: a valid token is admitted and echoes, any
/// other is denied with an answer, then closed.
fn attempt(fx: &Fixture, kind: Token, token: &str, seed: u64) -> Result<()> {
    let mut stream = super::fixture::dial_raw(&fx.topo.runner, super::fixture::service())?;
    let (status, message) = authenticate(&mut stream, token)?;
    if kind == Token::Valid {
        ensure!(
            status == 0,
            "a valid token was refused mid-burst: {message}"
        );
        return echo_roundtrip(&mut stream, seed, 4096);
    }
    ensure!(status == 1, "expected a denial, got {status}: {message}");
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut rest)?;
    ensure!(rest.is_empty(), "bytes after a denial");
    Ok(())
}
