//! `tcpgate firewall`: the guard table, without the agent.
//!
//! Exit codes: 0 done, 64 configuration error, 69 nft missing or failed
//! (EX_UNAVAILABLE).

use crate::config::{Config, EXIT_CONFIG};
use crate::firewall::{NftCommand, NftRunner, guard};

/// nft is missing or refused the change.
pub const EXIT_NFT: i32 = 69;

#[derive(Debug, clap::Args)]
pub struct FirewallArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Install or update the guard table from the configuration.
    ///
    /// Drops every `[[intercept.prefix]]` and `intercept.protect` prefix
    /// (all ports and protocols, but `intercept.pass`) in the forward path
    /// and for the bastion's own processes. The agent does the same at
    /// start and on SIGHUP; `cargo xtask install` runs this. A config
    /// without `[intercept]` protects nothing (exit 0, no change).
    Apply(ApplyArgs),
    /// Print the guard table as installed (with its drop counter).
    ///
    /// Exits 1 when there is none.
    Show,
    /// Remove the guard table: protected prefixes become reachable
    /// without a token while no agent runs.
    ///
    /// The agent never removes it, on stop or crash; `cargo xtask
    /// uninstall` runs this.
    Remove,
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
}

pub fn run(args: &FirewallArgs) -> i32 {
    run_with(&NftCommand, args)
}

fn run_with(nft: &dyn NftRunner, args: &FirewallArgs) -> i32 {
    match &args.action {
        Action::Apply(apply) => {
            let config = match Config::load(&apply.config.config) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("tcpgate: {e}");
                    return EXIT_CONFIG;
                }
            };
            let Some(section) = &config.intercept else {
                println!(
                    "tcpgate: {} has no [intercept] section: no guard table to install",
                    apply.config.config.display()
                );
                return 0;
            };
            let table = guard::Guard::new(
                &config.intercept_set,
                config.agent.upstream_mark,
                section.mark,
            );
            match guard::install(nft, &table) {
                Ok(()) => {
                    println!(
                        "tcpgate: guard table inet {} drops {} prefix(es)",
                        guard::TABLE,
                        table.protected.len()
                    );
                    0
                }
                Err(e) => nft_failed(&e),
            }
        }
        Action::Show => match nft.list(guard::TABLE) {
            Ok(Some(text)) => {
                print!("{text}");
                0
            }
            Ok(None) => {
                eprintln!("tcpgate: no guard table (inet {})", guard::TABLE);
                1
            }
            Err(e) => nft_failed(&e),
        },
        Action::Remove => match guard::remove(nft) {
            Ok(true) => {
                println!("tcpgate: guard table inet {} removed", guard::TABLE);
                0
            }
            Ok(false) => {
                println!(
                    "tcpgate: no guard table (inet {}); nothing to remove",
                    guard::TABLE
                );
                0
            }
            Err(e) => nft_failed(&e),
        },
    }
}

fn nft_failed(error: &crate::firewall::FirewallError) -> i32 {
    eprintln!("tcpgate: {}", crate::error_chain(error));
    EXIT_NFT
}
