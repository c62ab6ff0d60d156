//! Where the session watcher leaves a spliced session's socket events.
//!
//! Each live session needs one, so it must be small: an unbounded channel
//! cost about 780 bytes per session (its shared state and first block of
//! slots), a mailbox under 100. Events are readiness flags, so they
//! coalesce: the session learns which flags each socket raised since it
//! last looked, which is all it acts on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::sys::epoll::EpollFlags;
use tokio::sync::Notify;

use super::watcher::Side;

/// Flags raised on each socket since the session last looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketEvents {
    pub client: EpollFlags,
    pub upstream: EpollFlags,
}

impl SocketEvents {
    /// The sides that raised something, client first.
    pub fn raised(self) -> impl Iterator<Item = (Side, EpollFlags)> {
        [(Side::Client, self.client), (Side::Upstream, self.upstream)]
            .into_iter()
            .filter(|(_, flags)| !flags.is_empty())
    }
}

/// One session's mailbox: written by the watcher, read by the session.
#[derive(Debug, Default)]
pub struct Mailbox {
    /// Client flags in the low 32 bits, upstream flags in the high 32.
    flags: AtomicU64,
    closed: AtomicBool,
    notify: Notify,
}

impl Mailbox {
    /// Adds `flags` raised on `side` and wakes the session.
    pub fn post(&self, side: Side, flags: EpollFlags) {
        let bits = u64::from(flags.bits().cast_unsigned());
        let shifted = match side {
            Side::Client => bits,
            Side::Upstream => bits << 32,
        };
        self.flags.fetch_or(shifted, Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// The watcher stopped: the session's next [`Mailbox::recv`] says so.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Waits for events; `None` once the watcher is gone. Cancel-safe:
    /// flags stay in the mailbox until a call returns them.
    pub async fn recv(&self) -> Option<SocketEvents> {
        loop {
            let bits = self.flags.swap(0, Ordering::AcqRel);
            if bits != 0 {
                let flags = |half: u64| {
                    EpollFlags::from_bits_truncate(
                        u32::try_from(half & u64::from(u32::MAX))
                            .unwrap_or_default()
                            .cast_signed(),
                    )
                };
                return Some(SocketEvents {
                    client: flags(bits),
                    upstream: flags(bits >> 32),
                });
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            // notify_one keeps a permit when nobody waits, so a post
            // between the swap above and this wait is not missed.
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_coalesce_per_side() {
        let mailbox = Mailbox::default();
        mailbox.post(Side::Client, EpollFlags::EPOLLIN);
        mailbox.post(Side::Upstream, EpollFlags::EPOLLRDHUP);
        mailbox.post(Side::Client, EpollFlags::EPOLLRDHUP);
        let events = mailbox.recv().await.expect("open");
        assert_eq!(events.client, EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP);
        assert_eq!(events.upstream, EpollFlags::EPOLLRDHUP);
        assert_eq!(
            events.raised().map(|(side, _)| side).collect::<Vec<_>>(),
            [Side::Client, Side::Upstream]
        );
    }

    #[tokio::test]
    async fn a_post_wakes_a_waiting_session() {
        let mailbox = std::sync::Arc::new(Mailbox::default());
        let waiter = tokio::spawn({
            let mailbox = std::sync::Arc::clone(&mailbox);
            async move { mailbox.recv().await }
        });
        tokio::task::yield_now().await;
        mailbox.post(Side::Upstream, EpollFlags::EPOLLHUP);
        let events = waiter.await.expect("joined").expect("open");
        assert_eq!(events.upstream, EpollFlags::EPOLLHUP);
        assert!(events.client.is_empty());
    }

    #[tokio::test]
    async fn close_ends_the_session_after_pending_events() {
        let mailbox = Mailbox::default();
        mailbox.post(Side::Client, EpollFlags::EPOLLERR);
        mailbox.close();
        assert!(mailbox.recv().await.is_some(), "pending events first");
        assert!(mailbox.recv().await.is_none());
    }
}
