//! `tcpgate connect`: the client side of the token preamble.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::auth::client::{ClientError, TokenSource, connect_with_preamble};

mod stdio;

/// Exit status when the agent denies the token (`EX_NOPERM`).
pub(super) const EXIT_DENIED: i32 = 77;

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// Where the job's JWT is read, once per connection.
    #[command(flatten)]
    pub token: super::TokenArgs,
    /// Forward a local port instead of relaying stdin/stdout: every
    /// connection to this address is sent to TARGET with its own preamble.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// How long to wait for the connection and the agent's answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Without `--listen`: after the service closes its side, how long stdin
    /// is still relayed (a service may half-close and keep reading) before
    /// exiting with status 1. Stdout is closed at once either way.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub linger: Duration,
    /// The service to reach, as the runner would dial it (`HOST:PORT`),
    /// e.g. `192.0.2.10:5432`. As an ssh ProxyCommand: `%h:%p`.
    #[arg(value_name = "TARGET")]
    pub target: String,
}

pub fn run(args: &ConnectArgs) -> i32 {
    super::block_on(async {
        let target = match resolve(&args.target).await {
            Ok(addr) => addr,
            Err(e) => {
                eprintln!("tcpgate connect: {}", crate::error_chain(&e));
                return 2;
            }
        };
        match args.listen {
            Some(listen) => forward(listen, target, args).await,
            None => relay_stdio(target, args).await,
        }
    })
}

/// Why the connect target names no address.
#[derive(Debug, thiserror::Error)]
pub(super) enum ResolveError {
    #[error("cannot resolve {target:?} (expected HOST:PORT)")]
    Lookup {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} resolves to no address")]
    NoAddress(String),
}

pub(super) async fn resolve(target: &str) -> Result<SocketAddr, ResolveError> {
    if let Ok(addr) = target.parse() {
        return Ok(addr);
    }
    let mut addrs =
        tokio::net::lookup_host(target)
            .await
            .map_err(|source| ResolveError::Lookup {
                target: target.to_owned(),
                source,
            })?;
    addrs
        .next()
        .ok_or_else(|| ResolveError::NoAddress(target.to_owned()))
}

fn report(e: &ClientError) -> i32 {
    eprintln!("tcpgate connect: {}", crate::error_chain(e));
    match e {
        ClientError::Denied { .. } => EXIT_DENIED,
        e if TokenSource::is_usage_error(e) => crate::config::EXIT_CONFIG,
        _ => 1,
    }
}

async fn open(target: SocketAddr, args: &ConnectArgs) -> Result<TcpStream, ClientError> {
    let token = args.token.source()?.read()?;
    let stream = connect_with_preamble(target, &token, args.timeout).await?;
    relaying(&stream);
    Ok(stream)
}

/// A relay's socket sends what it is given at once (see
/// [`crate::sockopt::set_nodelay`]); where that fails it still works.
fn relaying(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// Relays stdin to the service and the service to stdout (ssh ProxyCommand).
async fn relay_stdio(target: SocketAddr, args: &ConnectArgs) -> i32 {
    let stream = match open(target, args).await {
        Ok(stream) => stream,
        Err(e) => return report(&e),
    };
    match stdio::relay(stream, target, args.linger).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tcpgate connect: {}", crate::error_chain(&e));
            1
        }
    }
}

/// A local port forward for tools that need one.
async fn forward(listen: SocketAddr, target: SocketAddr, args: &ConnectArgs) -> i32 {
    // Fail early on a missing or bad token, before anyone connects.
    let source = match args.token.source() {
        Ok(source) => source,
        Err(e) => return report(&e),
    };
    if let Err(e) = source.read() {
        return report(&e);
    }
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("tcpgate connect: cannot listen on {listen}: {e}");
            return 1;
        }
    };
    eprintln!("tcpgate connect: forwarding {listen} to {target}");
    loop {
        let (mut local, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("tcpgate connect: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return 0,
        };
        let source = source.clone();
        let timeout = args.timeout;
        tokio::spawn(async move {
            let token = match source.read() {
                Ok(token) => token,
                Err(e) => {
                    eprintln!("tcpgate connect: {peer}: {}", crate::error_chain(&e));
                    return;
                }
            };
            match connect_with_preamble(target, &token, timeout).await {
                Ok(mut remote) => {
                    relaying(&local);
                    relaying(&remote);
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                }
                // Dropping `local` closes it, so the local client sees the end.
                Err(e) => eprintln!("tcpgate connect: {peer}: {}", crate::error_chain(&e)),
            }
        });
    }
}
