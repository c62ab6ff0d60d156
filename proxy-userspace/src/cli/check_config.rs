//! `tcpgate check-config`.

use crate::config::{Config, EXIT_CONFIG};

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
}

pub fn run(args: &CheckConfigArgs) -> i32 {
    match Config::load(&args.config.config) {
        Ok(config) => {
            println!(
                "{}: valid ({} forward(s), data path {:?})",
                args.config.config.display(),
                config.forwards.len(),
                config.agent.datapath
            );
            0
        }
        Err(e) => {
            eprintln!("tcpgate: {e}");
            EXIT_CONFIG
        }
    }
}
