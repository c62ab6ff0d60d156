//! `cargo xtask demo`: one kernel-spliced session, end to end.

use anyhow::{Result, bail};
use clap::Args;

use crate::build::{self, Profile};
use crate::host::Host;
use crate::setup;

#[derive(Args, Debug)]
pub struct DemoArgs {}

pub fn run(host: &Host, _args: &DemoArgs) -> Result<()> {
    setup::ensure(host)?;
    let tcpgate = build::tcpgate_binary(host, Profile::Debug)?;
    println!("demo: tcpgate is at {}", tcpgate.display());
    bail!("the demo scenario is not implemented yet; only the build step runs so far")
}
