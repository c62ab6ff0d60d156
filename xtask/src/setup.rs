//! `cargo xtask setup`: install what building and testing tcpgate needs.
//!
//! Every step looks before it acts and leaves alone what is already in
//! place, so `build`, `test` and `demo` run this on each call: with nothing
//! to do it takes well under a second.

mod bpf_linker;
mod bpffs;
mod debian;
mod llvm_prefix;
mod moto;
mod toolchain;

use std::fmt::Display;
use std::time::Instant;

use anyhow::Result;

use crate::host::Host;

pub fn run(host: &Host) -> Result<()> {
    ensure(host)
}

/// Brings the machine to the state the build and the tests expect.
pub fn ensure(host: &Host) -> Result<()> {
    let started = Instant::now();
    let rustc = toolchain::RustcInfo::query()?;
    toolchain::ensure_components(host, &rustc)?;
    bpf_linker::ensure(host, &rustc)?;
    debian::ensure(host)?;
    moto::ensure(host)?;
    bpffs::ensure(host)?;
    println!("setup: done in {}", crate::took(started));
    Ok(())
}

/// One line per step, so a log shows what setup found and what it did.
fn report(step: &str, status: impl Display) {
    println!("setup: {step} ... {status}");
}
