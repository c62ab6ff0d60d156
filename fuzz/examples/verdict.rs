//! Prints the verdict of a target's check for each input file, the line a
//! regression's `.expected` file holds. Run from `fuzz/` on stable:
//!
//! ```text
//! cargo run --example verdict -- token_claims regressions/token_claims/glob-double-star-slash
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let check: fn(&[u8]) -> String = match args.next().as_deref() {
        Some("preamble") => tcpgate_fuzz::preamble::check,
        Some("token_claims") => tcpgate_fuzz::token_claims::check,
        Some("config") => tcpgate_fuzz::config::check,
        Some("grant_api_body") => tcpgate_fuzz::grant_api_body::check,
        _ => {
            eprintln!("usage: verdict preamble|token_claims|config|grant_api_body FILE...");
            return ExitCode::from(64);
        }
    };
    let mut status = ExitCode::SUCCESS;
    for path in args {
        match std::fs::read(&path) {
            Ok(data) => match std::panic::catch_unwind(|| check(&data)) {
                Ok(verdict) => println!("{path}: {verdict}"),
                Err(_) => {
                    println!("{path}: PANIC (see above)");
                    status = ExitCode::FAILURE;
                }
            },
            Err(e) => {
                eprintln!("{path}: cannot read: {e}");
                status = ExitCode::FAILURE;
            }
        }
    }
    status
}
