//! The guard table (`tcpgate firewall`): nftables rules that drop the
//! protected prefixes whether or not the agent runs. Install puts it in
//! place from the installed config, so the bastion is closed before the
//! service first starts; only uninstall (or `tcpgate firewall remove`)
//! takes it away. Packages and images get it from the postinst and the
//! agent's first start.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::layout::{CONFIG, Layout, Target};
use crate::cmd;

/// `tcpgate firewall apply` with the installed binary and config.
pub fn apply(layout: &Layout, binary: &Path) -> Result<()> {
    if layout.target != Target::System {
        return Ok(());
    }
    let output = cmd::read(
        Command::new(binary)
            .args(["firewall", "apply", "--config"])
            .arg(CONFIG),
    )?;
    println!("install: {}", output.trim());
    Ok(())
}

/// `tcpgate firewall remove`, while the binary is still there.
pub fn remove(layout: &Layout, binary: &Path) -> Result<()> {
    if layout.target != Target::System {
        return Ok(());
    }
    if !binary.exists() {
        println!(
            "uninstall: guard table ... not checked ({} is gone); \
             `nft delete table inet tcpgate_guard` removes it",
            binary.display()
        );
        return Ok(());
    }
    let output = cmd::read(Command::new(binary).args(["firewall", "remove"]))?;
    println!("uninstall: {}", output.trim());
    Ok(())
}
