//! A preamble's answer, acknowledged while the splice is set up, must not
//! cost the runner the target's last bytes.
//!
//! Before the splice the agent records how much each socket has handed to
//! TCP (`tcpi_bytes_acked + SIOCOUTQ`), and the drain barrier shuts a peer
//! down only once it has handed over that much plus every byte redirected
//! to it. The two halves were read one after the other. When the runner's
//! acknowledgement of the answer landed between them, on another CPU, the
//! answer's bytes were counted in neither: the baseline fell short, the
//! barrier passed before the target's last byte reached the runner, the
//! shutdown cut it off, and the runner saw a FIN with nothing before it
//! (the agent's log: `client socket error: Broken pipe`). The bench's
//! connection rate with RPS hit it about once in 7,000 preamble cycles.
//!
//! Here: receive packet steering on the bastion's links, so the
//! acknowledgements are processed on another CPU than the agent's, and
//! runners that each send a preamble, one byte, and read to the end, from
//! a target that answers one byte and closes. Every cycle must get its byte.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use tcpgate_tests::auth_fixture::{AuthFixture, authenticate};
use tcpgate_tests::servers::bind;
use tcpgate_tests::{dial, require_root};

/// Runners in flight, and the target's server threads.
const RUNNERS: usize = 16;
/// Bounds of the load: cycles, and time.
const CYCLES: usize = 40_000;
const LIMIT: Duration = Duration::from_secs(40);
/// Fewer cycles than this in the time limit would prove little.
const ENOUGH: usize = 2_000;

/// The target: reads one byte, answers one byte, closes.
fn one_byte_then_close(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut byte = [0u8; 1];
        if stream.read_exact(&mut byte).is_ok() {
            let _ = stream.write_all(b"!");
        }
    }
}

/// One cycle: connect, preamble, a byte each way, the target's close.
/// Returns what the runner read after its byte, or why it could not.
fn cycle(fx: &AuthFixture, token: &str) -> Result<Vec<u8>> {
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, token)?;
    ensure!(status == 0, "refused: {message}");
    stream.write_all(b"?")?;
    let mut got = Vec::new();
    stream.read_to_end(&mut got)?;
    Ok(got)
}

#[test]
fn the_targets_last_byte_survives_an_answer_acknowledged_during_the_splice() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = Arc::new(AuthFixture::start()?);
    fx.topo.spread_bastion_receive()?;
    let listener = Arc::new(bind(&fx.topo.target, AuthFixture::target(9000))?);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = (0..RUNNERS)
        .map(|_| {
            let (listener, stop) = (Arc::clone(&listener), Arc::clone(&stop));
            std::thread::spawn(move || one_byte_then_close(&listener, &stop))
        })
        .collect();
    let token = Arc::new(fx.token());
    let (done, cut) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let deadline = Instant::now() + LIMIT;
    let runners: Vec<_> = (0..RUNNERS)
        .map(|_| {
            let (fx, token) = (Arc::clone(&fx), Arc::clone(&token));
            let (done, cut) = (Arc::clone(&done), Arc::clone(&cut));
            std::thread::spawn(move || -> Result<Option<String>> {
                while Instant::now() < deadline && done.load(Ordering::Relaxed) < CYCLES {
                    let got = cycle(&fx, &token)?;
                    done.fetch_add(1, Ordering::Relaxed);
                    if got != b"!" {
                        cut.fetch_add(1, Ordering::Relaxed);
                        return Ok(Some(format!("read {got:?} instead of \"!\"")));
                    }
                }
                Ok(None)
            })
        })
        .collect();
    // Every runner is joined before any error is returned: a runner left
    // running would hold the fixture, and its namespaces and agent would
    // outlive the test.
    let outcomes: Vec<Result<Option<String>>> = runners
        .into_iter()
        .map(|runner| runner.join().expect("runner thread"))
        .collect();
    stop.store(true, Ordering::Relaxed);
    for _ in 0..RUNNERS {
        // A connection from the target's own namespace per server thread
        // lets its accept return and see the stop.
        let _ = dial(&fx.topo.target, AuthFixture::target(9000));
    }
    for server in servers {
        let _ = server.join();
    }
    let mut first = None;
    for outcome in outcomes {
        first = first.or(outcome?);
    }
    let (done, cut) = (done.load(Ordering::Relaxed), cut.load(Ordering::Relaxed));
    eprintln!("{done} preamble cycles, {cut} cut short");
    ensure!(
        cut == 0,
        "{cut} of {done} runners lost the target's last byte; the first {}",
        first.unwrap_or_default()
    );
    ensure!(
        done >= ENOUGH,
        "only {done} cycles in {LIMIT:?}: too few to show anything"
    );
    Ok(())
}
