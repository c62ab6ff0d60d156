//! Live sessions: admission against the session limit, and the handles that
//! let expiry, revocation and shutdown end sessions from outside.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::datapath::{EndReason, SessionMeta, StopHandle, StopSignal, stop_pair};

struct Handle {
    meta: SessionMeta,
    stop: StopHandle,
}

/// Shared by the accept loops, the grant expiry task and shutdown.
pub struct Registry {
    /// Boxed: the table keeps spare slots (up to half of it after it
    /// grows), and a spare pointer costs 8 bytes where a spare handle
    /// costs 184.
    sessions: Mutex<HashMap<u64, Box<Handle>>>,
    /// Admitted sessions, including those still connecting upstream.
    admitted: AtomicUsize,
    max: usize,
    emptied: Notify,
    /// Woken whenever a registered session is removed.
    departed: Notify,
    next_id: AtomicU64,
    id_prefix: u64,
}

/// A session told to stop by [`Registry::stop_listed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stopped {
    pub session: u64,
    pub grant: u64,
}

/// A slot under the session limit; released on drop.
pub struct Admission {
    registry: Arc<Registry>,
    id: u64,
    registered: bool,
}

impl Registry {
    #[must_use]
    pub fn new(max: usize) -> Arc<Self> {
        // Random high bits keep ids distinct across agent restarts (audit
        // logs outlive runs); ids stay below 2^56 for the watcher's tokens.
        let id_prefix = (rand::random::<u64>() & 0xffff) << 40;
        Arc::new(Self {
            sessions: Mutex::default(),
            admitted: AtomicUsize::new(0),
            max,
            emptied: Notify::new(),
            departed: Notify::new(),
            next_id: AtomicU64::new(1),
            id_prefix,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<Handle>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot if the limit allows, with a fresh session id.
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let mut current = self.admitted.load(Ordering::Relaxed);
        loop {
            if current >= self.max {
                return None;
            }
            match self.admitted.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        let id = self.id_prefix | (self.next_id.fetch_add(1, Ordering::Relaxed) & ((1 << 40) - 1));
        Some(Admission {
            registry: Arc::clone(self),
            id,
            registered: false,
        })
    }

    /// A slot for a session adopted from a predecessor, with its id. It
    /// was admitted there under the same limit, so it is not refused here.
    pub fn admit_adopted(self: &Arc<Self>, id: u64) -> Admission {
        self.admitted.fetch_add(1, Ordering::AcqRel);
        Admission {
            registry: Arc::clone(self),
            id,
            registered: false,
        }
    }

    /// Sessions admitted and not yet ended.
    #[must_use]
    pub fn len(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The limit from the configuration.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Ends every session matching `filter`; returns how many were told.
    pub fn stop_where(&self, reason: EndReason, filter: impl Fn(&SessionMeta) -> bool) -> usize {
        let sessions = self.lock();
        let mut told = 0;
        for handle in sessions.values().filter(|h| filter(&h.meta)) {
            handle.stop.stop(reason);
            told += 1;
        }
        told
    }

    /// Ends one session; returns whether it was live.
    pub fn stop_one(&self, id: u64, reason: EndReason) -> bool {
        self.lock().get(&id).is_some_and(|h| h.stop.stop(reason))
    }

    /// Ends every session matching `filter`; returns which, to wait for
    /// with [`Registry::wait_ended`].
    pub fn stop_listed(
        &self,
        reason: EndReason,
        filter: impl Fn(&SessionMeta) -> bool,
    ) -> Vec<Stopped> {
        let sessions = self.lock();
        sessions
            .values()
            .filter(|h| filter(&h.meta))
            .map(|h| {
                h.stop.stop(reason);
                Stopped {
                    session: h.meta.id,
                    grant: h.meta.grant_id,
                }
            })
            .collect()
    }

    /// Waits until none of `ids` is registered (each has been torn down),
    /// for at most `timeout`; returns those still registered then.
    pub async fn wait_ended(&self, ids: &[u64], timeout: std::time::Duration) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut left = ids.to_vec();
        loop {
            // Created before the check: `notify_waiters` reaches it from now.
            let departed = self.departed.notified();
            {
                let sessions = self.lock();
                left.retain(|id| sessions.contains_key(id));
            }
            if left.is_empty() || tokio::time::timeout_at(deadline, departed).await.is_err() {
                return left;
            }
        }
    }

    /// Metadata of every spliced session.
    #[must_use]
    pub fn snapshot(&self) -> Vec<SessionMeta> {
        self.lock().values().map(|h| h.meta.clone()).collect()
    }

    /// Waits until no session is admitted.
    pub async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

impl Admission {
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Registers the spliced session so it can be stopped from outside.
    pub fn register(&mut self, meta: SessionMeta) -> StopSignal {
        let (stop, signal) = stop_pair();
        self.registry
            .lock()
            .insert(self.id, Box::new(Handle { meta, stop }));
        self.registered = true;
        signal
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.registered {
            self.registry.lock().remove(&self.id);
            self.registry.departed.notify_waiters();
        }
        if self.registry.admitted.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.registry.emptied.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn meta(id: u64, grant_id: u64) -> SessionMeta {
        let addr = "192.0.2.10:5432".parse().expect("addr");
        SessionMeta {
            id,
            grant_id,
            started: SystemTime::now(),
            expires: None,
            client: "198.51.100.2:40000".parse().expect("addr"),
            destination: addr,
            upstream: addr,
            auth_method: 0,
            subject: "".into(),
        }
    }

    #[test]
    fn admission_respects_the_limit_and_frees_on_drop() {
        let registry = Registry::new(2);
        let a = registry.admit().expect("first");
        let b = registry.admit().expect("second");
        assert!(registry.admit().is_none(), "limit reached");
        assert_ne!(a.id(), b.id());
        drop(a);
        assert_eq!(registry.len(), 1);
        assert!(registry.admit().is_some());
    }

    #[test]
    fn stop_where_signals_only_matching_sessions() {
        let registry = Registry::new(10);
        let mut a = registry.admit().expect("a");
        let mut b = registry.admit().expect("b");
        let stop_a = a.register(meta(a.id(), 7));
        let stop_b = b.register(meta(b.id(), 8));
        assert_eq!(
            registry.stop_where(EndReason::Revoked, |m| m.grant_id == 7),
            1
        );
        assert_eq!(stop_a.reason(), Some(EndReason::Revoked));
        assert_eq!(stop_b.reason(), None);
        // A second, different reason does not overwrite the first.
        registry.stop_where(EndReason::AgentShutdown, |_| true);
        assert_eq!(stop_a.reason(), Some(EndReason::Revoked));
        assert_eq!(stop_b.reason(), Some(EndReason::AgentShutdown));
    }

    #[tokio::test]
    async fn wait_ended_returns_once_the_stopped_sessions_are_gone() {
        let registry = Registry::new(10);
        let mut sessions: Vec<Admission> =
            (0..3).map(|_| registry.admit().expect("slot")).collect();
        for (grant, s) in sessions.iter_mut().enumerate() {
            let _ = s.register(meta(s.id(), grant as u64 % 2));
        }
        let stopped = registry.stop_listed(EndReason::Revoked, |m| m.grant_id == 0);
        assert!(stopped.iter().all(|s| s.grant == 0), "{stopped:?}");
        let ids: Vec<u64> = stopped.iter().map(|s| s.session).collect();
        assert_eq!(ids.len(), 2, "sessions 0 and 2 have grant 0");
        let waiter = {
            let registry = Arc::clone(&registry);
            let ids = ids.clone();
            tokio::spawn(async move { registry.wait_ended(&ids, Duration::from_secs(60)).await })
        };
        let ending = sessions.remove(2);
        drop(ending);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one stopped session is still there");
        drop(sessions.remove(0));
        assert_eq!(waiter.await.expect("join"), Vec::<u64>::new());
        // The bound holds when a session never ends.
        let ids = vec![registry.stop_listed(EndReason::Revoked, |_| true)[0].session];
        let left = registry.wait_ended(&ids, Duration::from_millis(10)).await;
        assert_eq!(left, ids);
    }

    #[tokio::test]
    async fn wait_empty_returns_when_last_session_ends() {
        let registry = Registry::new(10);
        let a = registry.admit().expect("a");
        let waiter = {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move { registry.wait_empty().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.expect("join");
    }
}
