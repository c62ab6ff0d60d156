//! `tcpgate-bench demo` (run by `cargo xtask demo`): the main job, end to end, on an embedded default.
//!
//! A runner, a bastion and a target in network namespaces of the demo's
//! own. The agent on the bastion intercepts 192.0.2.0/24, checks tokens
//! against a JWKS served over HTTPS, and splices admitted sessions in the
//! kernel. The demo shows a denied connection, an admitted one (with the
//! byte counts the eBPF program kept and SHA-256 digests of both
//! directions), and a teardown when a grant expires; then it removes
//! everything it created.

mod scenario;

use std::path::Path;

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Bytes to send each way through the admitted session.
    #[arg(long, default_value_t = 64 << 20)]
    pub bytes: u64,
    /// Print the agent's log at the end.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(tcpgate: &Path, args: &DemoArgs) -> Result<()> {
    if !crate::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    scenario::run(tcpgate, args)
}
