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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::firewall::FirewallError;

    /// Records scripts; `table` is what `list` answers.
    struct FakeNft {
        scripts: Mutex<Vec<String>>,
        table: Option<String>,
    }

    impl NftRunner for FakeNft {
        fn apply(&self, script: &str) -> Result<(), FirewallError> {
            self.scripts.lock().expect("lock").push(script.to_owned());
            Ok(())
        }
        fn list(&self, _: &str) -> Result<Option<String>, FirewallError> {
            Ok(self.table.clone())
        }
    }

    fn fake(table: Option<&str>) -> FakeNft {
        FakeNft {
            scripts: Mutex::default(),
            table: table.map(str::to_owned),
        }
    }

    fn apply_with(config: &str) -> (i32, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tcpgate.toml");
        std::fs::write(&path, config).expect("write");
        let nft = fake(None);
        let args = FirewallArgs {
            action: Action::Apply(ApplyArgs {
                config: crate::cli::ConfigArg { config: path },
            }),
        };
        let code = run_with(&nft, &args);
        (code, nft.scripts.into_inner().expect("lock"))
    }

    #[test]
    fn apply_installs_the_guard_from_the_intercepted_prefixes() {
        let (code, scripts) = apply_with(
            "auth = \"none\"\n[intercept]\npass = [\"icmp\"]\nprotect = [\"10.0.0.0/8\"]\n\
             [[intercept.prefix]]\nprefix = \"192.0.2.0/24\"\nports = [\"22\"]\n",
        );
        assert_eq!(code, 0);
        assert_eq!(scripts.len(), 1);
        assert!(
            scripts[0].contains("ip daddr { 10.0.0.0/8, 192.0.2.0/24 } jump protected"),
            "{}",
            scripts[0]
        );
        assert!(scripts[0].contains("meta l4proto icmp accept"));
    }

    #[test]
    fn a_bad_config_exits_64_and_changes_nothing() {
        let (code, scripts) = apply_with("auth = \"none\"\n[intercept]\npass = [\"udp\"]\n");
        assert_eq!(code, EXIT_CONFIG);
        assert!(scripts.is_empty());
        let (code, scripts) =
            apply_with("auth = \"none\"\n[intercept]\nprotect = [\"192.0.2.1/24\"]\n");
        assert_eq!(code, EXIT_CONFIG);
        assert!(scripts.is_empty());
    }

    #[test]
    fn show_without_a_table_exits_1_and_remove_is_idempotent() {
        let args = |action| FirewallArgs { action };
        assert_eq!(run_with(&fake(None), &args(Action::Show)), 1);
        assert_eq!(run_with(&fake(Some("table")), &args(Action::Show)), 0);
        let nft = fake(None);
        assert_eq!(run_with(&nft, &args(Action::Remove)), 0);
        assert_eq!(
            nft.scripts.into_inner().expect("lock"),
            ["table inet tcpgate_guard {}\ndelete table inet tcpgate_guard\n"]
        );
    }
}
