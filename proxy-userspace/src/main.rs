use clap::Parser;

fn main() {
    // Before anything builds a TLS configuration (grant API, etcd, JWKS).
    tcpgate::install_crypto_provider();
    let cli = tcpgate::cli::Cli::parse();
    if let Err(e) = tcpgate::cli::init_logging(cli.log_format, &cli.log_level) {
        // One level of cause only: tracing's filter errors already print
        // their own causes in their text.
        let cause = std::error::Error::source(&e)
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        eprintln!("tcpgate: {e}{cause}");
        std::process::exit(tcpgate::config::EXIT_CONFIG);
    }
    std::process::exit(tcpgate::cli::dispatch(cli));
}
