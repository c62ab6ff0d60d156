//! tcpgate's nftables tables, behind a small seam ([`NftRunner`]) so the
//! generated rulesets are unit-tested without root.
//!
//! Both tables are `inet` (one table for IPv4 and IPv6) and named, so they
//! coexist with the operator's own firewall: a drop in any table is final,
//! whatever another table accepts.
//! - [`guard`] (`inet tcpgate_guard`): drops every protected prefix in the
//!   bastion's forward path and for its own processes. It does not depend
//!   on the agent being alive: the agent installs and updates it, but never
//!   removes it; only `tcpgate firewall remove` and `cargo xtask uninstall` do.
//! - `inet tcpgate_intercept` (`crate::intercept::marking`): marks the
//!   packets to intercept; the agent's own, removed on a clean stop.
//!
//! Every change is one `nft -f -` transaction: a table is replaced, never
//! absent in between.

pub mod guard;

use std::io::Write as _;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run `nft` (is nftables installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("`nft {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// Runs nft; the seam tests replace.
pub trait NftRunner: Send + Sync {
    /// Runs `script` with `nft -f -`, as one transaction.
    fn apply(&self, script: &str) -> Result<(), FirewallError>;
    /// `nft list table inet <table>`, or `None` when there is no such table.
    fn list(&self, table: &str) -> Result<Option<String>, FirewallError>;
}

/// The real nft (nftables package).
pub struct NftCommand;

impl NftRunner for NftCommand {
    fn apply(&self, script: &str) -> Result<(), FirewallError> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(FirewallError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error shows up as nft's own failure below.
            let _ = stdin.write_all(script.as_bytes());
        }
        let output = child.wait_with_output().map_err(FirewallError::Spawn)?;
        if output.status.success() {
            Ok(())
        } else {
            Err(FirewallError::Failed {
                args: "-f -".to_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    fn list(&self, table: &str) -> Result<Option<String>, FirewallError> {
        let args = ["list", "table", "inet", table];
        let output = Command::new("nft")
            .args(args)
            .output()
            .map_err(FirewallError::Spawn)?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if output.status.success() {
            Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()))
        } else if stderr.contains("No such file or directory") {
            Ok(None)
        } else {
            Err(FirewallError::Failed {
                args: args.join(" "),
                stderr,
            })
        }
    }
}

/// A script that replaces `inet <table>` with `body` in one transaction
/// (creating it first makes the delete valid when it did not exist).
#[must_use]
pub fn replace_script(table: &str, body: &str) -> String {
    format!("{}table inet {table} {{\n{body}}}\n", remove_script(table))
}

/// A script that removes `inet <table>`, present or not.
#[must_use]
pub fn remove_script(table: &str) -> String {
    format!("table inet {table} {{}}\ndelete table inet {table}\n")
}

/// Removes `inet <table>`; says whether it was there.
pub fn remove_table(runner: &dyn NftRunner, table: &str) -> Result<bool, FirewallError> {
    let existed = runner.list(table)?.is_some();
    runner.apply(&remove_script(table))?;
    Ok(existed)
}
