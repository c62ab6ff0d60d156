//! The bench's own load generator and servers run inside xtask, and an
//! unoptimized build of them (what `cargo xtask` compiles) would throttle
//! the connection-rate and latency figures. So a debug xtask builds xtask
//! in release mode and hands over to it.

use std::os::unix::process::CommandExt as _;

use anyhow::{Result, bail};

use crate::host::Host;

/// Whether this xtask binary was built without optimizations.
pub fn is_debug_build() -> bool {
    cfg!(debug_assertions)
}

/// Builds xtask with `--release` and replaces this process with it, running
/// the same command line. Returns only on failure.
pub fn reexec_release(host: &Host) -> Result<()> {
    println!("bench: building xtask in release mode for the load generator");
    let exe = crate::build::build_executable(
        host,
        &["build", "--release", "--package", "xtask"],
        "xtask",
    )?;
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    bail!("cannot run {}: {err}", exe.display())
}
