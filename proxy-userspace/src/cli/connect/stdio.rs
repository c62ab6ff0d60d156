//! `tcpgate connect` without `--listen`: one connection relayed to
//! stdin/stdout, as an ssh `ProxyCommand` uses it.
//!
//! How it ends:
//! - stdin reaches EOF: the service gets a half-close (`shutdown(SHUT_WR)`)
//!   and its answer is still relayed until it closes too; then exit 0.
//! - the service closes first: stdout is closed at once, so the program on
//!   the other end of the pipe sees EOF, and stdin is relayed for at most
//!   `--linger` more (a service may only have half-closed); exit 0 if stdin
//!   ends within it, else 1.
//! - a reset or any other error, in either direction: exit 1 at once.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Why the relay failed; printed on stderr, exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("connection to {target} failed")]
    Receive {
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("sending stdin to {target} failed")]
    Send {
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "{target} closed the connection and stdin was still open {linger:?} later \
         (see --linger)"
    )]
    ClosedByService {
        target: SocketAddr,
        linger: Duration,
    },
}

/// Relays until the connection has ended, as the module documentation says.
pub async fn relay(
    stream: TcpStream,
    target: SocketAddr,
    linger: Duration,
) -> Result<(), RelayError> {
    let (mut from_service, mut to_service) = stream.into_split();
    // On its own task: tokio's stdin reads on a blocking thread, which
    // nothing can interrupt, so this side must never be waited for.
    let mut upload: JoinHandle<io::Result<u64>> = tokio::spawn(async move {
        let copied = tokio::io::copy(&mut tokio::io::stdin(), &mut to_service).await?;
        to_service.shutdown().await?;
        Ok(copied)
    });
    let download = async {
        let mut stdout = tokio::io::stdout();
        let copied = tokio::io::copy(&mut from_service, &mut stdout).await?;
        stdout.flush().await?;
        Ok::<_, io::Error>(copied)
    };
    tokio::pin!(download);
    let receive = |source| RelayError::Receive { target, source };
    let send = |source| RelayError::Send { target, source };
    tokio::select! {
        received = &mut download => {
            received.map_err(receive)?;
            close_stdout();
            match tokio::time::timeout(linger, upload).await {
                Ok(sent) => joined(sent).map_err(send),
                Err(_) => Err(RelayError::ClosedByService { target, linger }),
            }
        }
        sent = &mut upload => {
            joined(sent).map_err(send)?;
            // Half-closed: the service may still answer. How long it may
            // take is the agent's `drain_timeout`, not ours to decide.
            download.await.map(drop).map_err(receive)
        }
    }
}

fn joined(sent: Result<io::Result<u64>, tokio::task::JoinError>) -> io::Result<()> {
    sent.map_err(io::Error::other)?.map(drop)
}

/// Points fd 1 at /dev/null: the pipe's reader sees EOF now, even while
/// this process still waits for stdin, and nothing written later can reach
/// a file that happens to reuse the descriptor.
fn close_stdout() {
    let closed = std::fs::File::open("/dev/null")
        .and_then(|null| nix::unistd::dup2_stdout(null).map_err(io::Error::from));
    if let Err(e) = closed {
        // Only delays the reader's EOF until this process exits.
        eprintln!("tcpgate connect: cannot close stdout early: {e}");
    }
}
