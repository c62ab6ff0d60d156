//! The target's TCP servers for the latency and authentication measures,
//! on a small tokio runtime. Listeners are bound from a thread inside the
//! target namespace; accepted sockets belong to it whatever thread serves
//! them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use anyhow::{Context as _, Result};
use tcpgate_tests::Netns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// What a server does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Echo everything until EOF (latency).
    Echo,
    /// Read one byte, echo it, close (connection rate).
    OneByteThenClose,
    /// Echo one byte, then hold the connection until the peer ends it
    /// (idle sessions).
    Hold,
    /// Read a 4-byte session number, echo it, then record when the
    /// connection ends (teardown latency).
    Observe,
}

/// When the server side of an observed session saw it end.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    pub session: u32,
    pub at: SystemTime,
}

#[derive(Default)]
pub struct Shared {
    /// Connections currently held by [`Behaviour::Hold`].
    pub held: AtomicUsize,
    /// Sessions that [`Behaviour::Observe`] saw end.
    pub ended: Mutex<Vec<Ended>>,
}

/// The running servers; dropping stops them and closes every connection.
pub struct Servers {
    pub shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Servers {
    pub fn start(target: &Netns, binds: &[(SocketAddr, Behaviour)]) -> Result<Servers> {
        let mut listeners = Vec::new();
        for &(addr, behaviour) in binds {
            let listener = target
                .try_run(move || std::net::TcpListener::bind(addr))?
                .with_context(|| format!("bind {addr} in the target namespace"))?;
            listener.set_nonblocking(true)?;
            listeners.push((listener, behaviour));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-target")
            .enable_all()
            .build()
            .context("start the target servers' runtime")?;
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = oneshot::channel();
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("bench-target".into())
            .spawn(move || {
                runtime.block_on(async move {
                    for (listener, behaviour) in listeners {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                tokio::spawn(serve(listener, behaviour, Arc::clone(&for_thread)));
                            }
                            Err(err) => eprintln!("bench: target listener: {err}"),
                        }
                    }
                    let _ = stopped.await;
                });
                // Dropping the runtime cancels every task and closes its sockets.
                runtime.shutdown_background();
            })
            .context("start the target servers' thread")?;
        Ok(Servers {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(listener: TcpListener, behaviour: Behaviour, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, behaviour, Arc::clone(&shared)));
            }
            // Out of fds or similar: back off instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn handle(mut stream: TcpStream, behaviour: Behaviour, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    match behaviour {
        Behaviour::Echo => {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                if stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
        Behaviour::OneByteThenClose => {
            let mut byte = [0u8; 1];
            if stream.read_exact(&mut byte).await.is_ok() {
                let _ = stream.write_all(&byte).await;
            }
        }
        Behaviour::Hold => {
            let mut byte = [0u8; 1];
            if stream.read_exact(&mut byte).await.is_ok() {
                // Counted before the echo, so a client that got its echo
                // is always counted.
                shared.held.fetch_add(1, Ordering::SeqCst);
                if stream.write_all(&byte).await.is_ok() {
                    let _ = stream.read(&mut byte).await;
                }
                shared.held.fetch_sub(1, Ordering::SeqCst);
            }
        }
        Behaviour::Observe => {
            let mut number = [0u8; 4];
            if stream.read_exact(&mut number).await.is_ok()
                && stream.write_all(&number).await.is_ok()
            {
                // Returns at EOF or at the RST of a teardown.
                let mut rest = [0u8; 64];
                while let Ok(1..) = stream.read(&mut rest).await {}
                let at = SystemTime::now();
                let session = u32::from_be_bytes(number);
                if let Ok(mut ended) = shared.ended.lock() {
                    ended.push(Ended { session, at });
                }
            }
        }
    }
}
