//! The interception tests' shared agent and upstream body
//! (intercept.rs, intercept_lifecycle.rs).

use anyhow::Result;

use crate::{Agent, Payload, Topology, intercept_config};

/// The intercepted HTTP port.
pub const HTTP: u16 = 80;
/// The intercepted database port (v4 prefix only).
pub const DB: u16 = 5432;

/// What the target's HTTP servers serve: 256 KiB.
#[must_use]
pub fn body() -> Vec<u8> {
    Payload::new(42, 256 * 1024).to_vec()
}

/// Starts an agent in the bastion intercepting HTTP on the target
/// prefixes (v4 and v6), plus port 5432 on the v4 one.
pub fn start(topo: &Topology) -> Result<Agent> {
    let builder = Agent::builder(&topo.bastion)?;
    let config = intercept_config(
        &builder,
        &[
            ("192.0.2.0/24", &["80", "5432"]),
            ("2001:db8:2::/64", &["80"]),
        ],
        "",
    );
    Ok(builder.config(config).spawn()?)
}
