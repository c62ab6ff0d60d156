use clap::Parser;

fn main() {
    let cli = tcpgate::cli::Cli::parse();
    if let Err(e) = tcpgate::cli::init_logging(cli.log_format, &cli.log_level) {
        eprintln!("tcpgate: {e}");
        std::process::exit(tcpgate::config::EXIT_CONFIG);
    }
    std::process::exit(tcpgate::cli::dispatch(cli));
}
