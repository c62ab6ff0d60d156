//! Small threaded TCP servers and a client dialer that live in a namespace.
//!
//! Listeners are bound inside the namespace (via [`Netns::run`]) before the
//! helper returns, so a test can dial as soon as it has the address. Sockets
//! keep the namespace they were made in, so the serving threads themselves
//! are plain threads.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::netns::{Netns, NetnsError};

/// How long a server waits for a connection before giving up.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `dial` waits for the TCP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout set on every stream these helpers hand out, so a
/// stuck transfer fails the test instead of hanging it. Override it with
/// `set_read_timeout` / `set_write_timeout` where a test idles on purpose.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

const ACCEPT_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot listen on {addr} in netns {netns}")]
    Bind {
        netns: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("accepting on {addr} failed")]
    Accept {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("no connection to {addr} within {timeout:?}")]
    AcceptTimeout { addr: SocketAddr, timeout: Duration },
    #[error("cannot connect from netns {netns} to {addr}")]
    Connect {
        netns: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a server thread")]
    Thread(#[source] io::Error),
}

/// A listener bound to `addr` inside `ns` (port 0 picks a free port).
pub fn bind(ns: &Netns, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    ns.try_run(|| TcpListener::bind(addr))?
        .map_err(|source| ServerError::Bind {
            netns: ns.name().to_owned(),
            addr,
            source,
        })
}

/// Connects from inside `ns` to `addr`, with [`CONNECT_TIMEOUT`] and the
/// default [`IO_TIMEOUT`] set on the stream.
pub fn dial(ns: &Netns, addr: SocketAddr) -> Result<TcpStream, ServerError> {
    let connect_error = |source| ServerError::Connect {
        netns: ns.name().to_owned(),
        addr,
        source,
    };
    let stream = ns
        .try_run(|| TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))?
        .map_err(connect_error)?;
    set_io_timeouts(&stream).map_err(connect_error)?;
    Ok(stream)
}

fn set_io_timeouts(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))
}

/// Accepts one connection, polling so that it gives up at `deadline` or when
/// `stop` is set (`Ok(None)`).
fn accept_until(
    listener: &TcpListener,
    addr: SocketAddr,
    deadline: Option<Instant>,
    stop: &AtomicBool,
) -> Result<Option<(TcpStream, SocketAddr)>, ServerError> {
    let accept_error = |source| ServerError::Accept { addr, source };
    listener.set_nonblocking(true).map_err(accept_error)?;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                set_io_timeouts(&stream).map_err(accept_error)?;
                return Ok(Some((stream, peer)));
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(accept_error(err)),
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Err(ServerError::AcceptTimeout {
                addr,
                timeout: ACCEPT_TIMEOUT,
            });
        }
        thread::sleep(ACCEPT_POLL);
    }
}

/// A server that accepts one connection and runs a closure on it.
#[derive(Debug)]
pub struct OneShot<R> {
    local_addr: SocketAddr,
    handle: JoinHandle<Result<R, ServerError>>,
}

/// Binds `addr` in `ns`, then on a thread accepts one connection (waiting at
/// most [`ACCEPT_TIMEOUT`]) and calls `f(stream, peer_addr)`. The listener
/// is listening when this returns.
pub fn serve_once<F, R>(ns: &Netns, addr: SocketAddr, f: F) -> Result<OneShot<R>, ServerError>
where
    F: FnOnce(TcpStream, SocketAddr) -> R + Send + 'static,
    R: Send + 'static,
{
    let listener = bind(ns, addr)?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        netns: ns.name().to_owned(),
        addr,
        source,
    })?;
    let handle = thread::Builder::new()
        .name(format!("serve-once-{local_addr}"))
        .spawn(move || {
            let never = AtomicBool::new(false);
            let deadline = Some(Instant::now() + ACCEPT_TIMEOUT);
            match accept_until(&listener, local_addr, deadline, &never)? {
                Some((stream, peer)) => {
                    drop(listener);
                    Ok(f(stream, peer))
                }
                None => Err(ServerError::AcceptTimeout {
                    addr: local_addr,
                    timeout: ACCEPT_TIMEOUT,
                }),
            }
        })
        .map_err(ServerError::Thread)?;
    Ok(OneShot { local_addr, handle })
}

impl<R> OneShot<R> {
    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits for the closure's result; a panic in it is propagated.
    pub fn join(self) -> Result<R, ServerError> {
        self.handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

type Handlers<R> = Vec<JoinHandle<R>>;

/// A server that accepts up to `max_conns` connections, each handled on its
/// own thread, until stopped.
#[derive(Debug)]
pub struct AcceptLoop<R> {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<Result<Handlers<R>, ServerError>>>,
}

/// Binds `addr` in `ns` and accepts up to `max_conns` connections, calling
/// `handler(stream, peer_addr)` on a new thread for each. The listener is
/// listening when this returns. There is no accept timeout: the loop runs
/// until [`AcceptLoop::stop`] or drop.
pub fn accept_loop<F, R>(
    ns: &Netns,
    addr: SocketAddr,
    max_conns: usize,
    handler: F,
) -> Result<AcceptLoop<R>, ServerError>
where
    F: Fn(TcpStream, SocketAddr) -> R + Send + Sync + 'static,
    R: Send + 'static,
{
    let listener = bind(ns, addr)?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        netns: ns.name().to_owned(),
        addr,
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let handler = Arc::new(handler);
    let acceptor_stop = Arc::clone(&stop);
    let acceptor = thread::Builder::new()
        .name(format!("accept-loop-{local_addr}"))
        .spawn(move || {
            let mut handlers = Vec::new();
            while handlers.len() < max_conns {
                let Some((stream, peer)) =
                    accept_until(&listener, local_addr, None, &acceptor_stop)?
                else {
                    break;
                };
                let handler = Arc::clone(&handler);
                let spawned = thread::Builder::new()
                    .name(format!("conn-{peer}"))
                    .spawn(move || handler(stream, peer))
                    .map_err(ServerError::Thread)?;
                handlers.push(spawned);
            }
            Ok(handlers)
        })
        .map_err(ServerError::Thread)?;
    Ok(AcceptLoop {
        local_addr,
        stop,
        acceptor: Some(acceptor),
    })
}

impl<R> AcceptLoop<R> {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, waits for every connection handler, and returns
    /// their results in accept order. A handler's panic is propagated.
    pub fn stop(mut self) -> Result<Vec<R>, ServerError> {
        let handlers = self.stop_accepting()?;
        Ok(handlers
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect())
    }

    fn stop_accepting(&mut self) -> Result<Handlers<R>, ServerError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.acceptor.take() {
            Some(acceptor) => acceptor
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => Ok(Vec::new()),
        }
    }
}

impl<R> Drop for AcceptLoop<R> {
    /// Stops accepting; handler threads still running are left to finish
    /// on their own (their streams have [`IO_TIMEOUT`]).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            match acceptor.join() {
                Ok(Ok(_handlers)) => {}
                Ok(Err(err)) => eprintln!("tcpgate-tests: accept loop {}: {err}", self.local_addr),
                Err(_) => eprintln!("tcpgate-tests: accept loop {} panicked", self.local_addr),
            }
        }
    }
}
