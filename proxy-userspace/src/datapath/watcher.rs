//! One epoll instance for every spliced socket, registered for hang-up and
//! error events only.
//!
//! A spliced socket's data-ready callback still wakes waiters for every
//! batch of redirected bytes. Registering `EPOLLIN` (as tokio does) would
//! wake the agent per batch; with only `EPOLLRDHUP` (plus the implicit
//! `EPOLLERR`/`EPOLLHUP`) epoll filters those wakeups out, and an idle or
//! busy session costs the agent nothing until it ends.
//!
//! The verdict program's `WAKEUPS` ring buffer is in the same epoll set:
//! its records ask a session to look at a direction's backlog now (see
//! `DirectionMode::wake_at`), and reach the session as an `EPOLLIN` event
//! on that direction's source socket, which a spliced socket never reports
//! itself.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use aya::maps::{MapData, RingBuf};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use proxy_common::session::{DIRECTION_UP, WakeEvent};
use tokio::io::unix::AsyncFd;

pub use super::mailbox::{Mailbox, SocketEvents};

/// Which socket of a session an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

type Subscribers = Mutex<HashMap<u64, Arc<Mailbox>>>;

/// Shared by every eBPF session.
pub struct Watcher {
    epoll: Arc<AsyncFd<EpollFd>>,
    subscribers: Arc<Subscribers>,
}

/// The epoll token of the ring buffer (session tokens are `id << 1 | side`,
/// and session ids never reach the top bit).
const WAKEUPS_TOKEN: u64 = u64::MAX;

fn token(session_id: u64, side: Side) -> u64 {
    (session_id << 1) | u64::from(side == Side::Upstream)
}

impl Watcher {
    /// Creates the epoll instance and its dispatcher task; `wakeups` is the
    /// verdict program's ring buffer of [`WakeEvent`]s.
    pub fn new(wakeups: Option<RingBuf<MapData>>) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        // SAFETY: the epoll fd is owned by `EpollFd` and lives exactly as long
        // as the AsyncFd wrapping it.
        let epoll = unsafe {
            AsyncFd::register_with_interest(EpollFd(epoll), tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        if let Some(ring) = &wakeups {
            epoll.get_ref().0.add(
                ring.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, WAKEUPS_TOKEN),
            )?;
        }
        let epoll = Arc::new(epoll);
        let subscribers: Arc<Subscribers> = Arc::default();
        tokio::spawn(dispatch(
            Arc::clone(&epoll),
            Arc::clone(&subscribers),
            wakeups,
        ));
        Ok(Self { epoll, subscribers })
    }

    /// Watches both sockets of a session. Events already pending (an EOF
    /// that arrived before registration) are reported at once.
    pub fn watch(
        &self,
        session_id: u64,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
    ) -> io::Result<Arc<Mailbox>> {
        let mailbox = Arc::new(Mailbox::default());
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session_id, Arc::clone(&mailbox));
        let interest = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        let epoll = &self.epoll.get_ref().0;
        let added = epoll
            .add(
                client,
                EpollEvent::new(interest, token(session_id, Side::Client)),
            )
            .and_then(|()| {
                epoll.add(
                    upstream,
                    EpollEvent::new(interest, token(session_id, Side::Upstream)),
                )
            });
        if let Err(e) = added {
            self.unwatch(session_id, client, upstream);
            return Err(e.into());
        }
        Ok(mailbox)
    }

    /// Stops watching sockets that stay open (`watch` failed half-way).
    fn unwatch(&self, session_id: u64, client: BorrowedFd<'_>, upstream: BorrowedFd<'_>) {
        let epoll = &self.epoll.get_ref().0;
        // Either may not be registered.
        let _ = epoll.delete(client);
        let _ = epoll.delete(upstream);
        self.forget(session_id);
    }

    /// Stops watching a session whose sockets are closed: closing the last
    /// descriptor of a socket took it out of the epoll set already, so only
    /// its mailbox is left (an `epoll_ctl` on the closed numbers could hit
    /// a newer socket that reuses one).
    pub fn forget(&self, session_id: u64) {
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session_id);
    }
}

async fn dispatch(
    epoll: Arc<AsyncFd<EpollFd>>,
    subscribers: Arc<Subscribers>,
    mut wakeups: Option<RingBuf<MapData>>,
) {
    let mut events = vec![EpollEvent::empty(); 256];
    loop {
        let mut guard = match epoll.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!(error = %e, "session watcher failed; sessions will not see hang-ups");
                close_all(&subscribers);
                return;
            }
        };
        let ready = match guard.get_inner().0.wait(&mut events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait failed");
                close_all(&subscribers);
                return;
            }
        };
        if ready < events.len() {
            guard.clear_ready();
        }
        let subscribers = subscribers.lock().unwrap_or_else(PoisonError::into_inner);
        for event in &events[..ready] {
            let data = event.data();
            if data == WAKEUPS_TOKEN {
                if let Some(ring) = &mut wakeups {
                    wake_sessions(ring, &subscribers);
                }
                continue;
            }
            let side = if data & 1 == 1 {
                Side::Upstream
            } else {
                Side::Client
            };
            if let Some(mailbox) = subscribers.get(&(data >> 1)) {
                mailbox.post(side, event.events());
            }
        }
    }
}

/// Hands every queued wake-up to its session.
fn wake_sessions(ring: &mut RingBuf<MapData>, subscribers: &HashMap<u64, Arc<Mailbox>>) {
    while let Some(item) = ring.next() {
        // A short record is never written by the verdict program: skipped.
        let Some(event) = crate::sys_bpf::read_pod::<WakeEvent>(&item) else {
            continue;
        };
        if let Some(mailbox) = subscribers.get(&event.session_id) {
            let side = if event.direction == DIRECTION_UP {
                Side::Client
            } else {
                Side::Upstream
            };
            mailbox.post(side, EpollFlags::EPOLLIN);
        }
    }
}

/// Tells every session the watcher is gone (they end with an error).
fn close_all(subscribers: &Subscribers) {
    for mailbox in subscribers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
    {
        mailbox.close();
    }
}

impl AsFd for EpollFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.0.as_fd()
    }
}
