//! How expiry, revocation and shutdown end a session from outside.
//!
//! One pair per live session, so it is kept small: a `tokio::sync::watch`
//! channel cost about 330 bytes per session, this about 60. The first
//! reason given wins; the session learns it at its next look.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use super::EndReason;

#[derive(Debug, Default)]
struct StopCell {
    reason: Mutex<Option<EndReason>>,
    notify: Notify,
}

/// The registry's side: asks the session to end.
#[derive(Debug)]
pub struct StopHandle(Arc<StopCell>);

/// The session's side: learns that it must end, and why.
#[derive(Debug)]
pub struct StopSignal(Arc<StopCell>);

/// A connected handle and signal.
#[must_use]
pub fn stop_pair() -> (StopHandle, StopSignal) {
    let cell = Arc::new(StopCell::default());
    (StopHandle(Arc::clone(&cell)), StopSignal(cell))
}

impl StopHandle {
    /// Asks the session to end for `reason`; returns false if it was
    /// already asked (the first reason stays).
    pub fn stop(&self, reason: EndReason) -> bool {
        let mut current = self.0.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if current.is_some() {
            return false;
        }
        *current = Some(reason);
        drop(current);
        // notify_one keeps a permit if the session is not waiting right now.
        self.0.notify.notify_one();
        true
    }
}

impl StopSignal {
    /// Why the session must end, once asked.
    #[must_use]
    pub fn reason(&self) -> Option<EndReason> {
        *self.0.reason.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the session is asked to end. Cancel-safe.
    pub async fn stopped(&self) -> EndReason {
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            self.0.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_reason_wakes_the_session_and_stays() {
        let (handle, signal) = stop_pair();
        assert_eq!(signal.reason(), None);
        let waiter = tokio::spawn(async move { signal.stopped().await });
        tokio::task::yield_now().await;
        assert!(handle.stop(EndReason::Revoked));
        assert!(!handle.stop(EndReason::AgentShutdown));
        assert_eq!(waiter.await.expect("joined"), EndReason::Revoked);
    }
}
