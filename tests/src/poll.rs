//! [`eventually`]: the one way tests and the toolkit wait for a condition
//! that nothing signals (a file line, a process exit, a kernel state), so
//! every wait is bounded and fails with a message naming what it waited for.

use std::convert::Infallible;
use std::time::{Duration, Instant};

/// How often a condition is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A condition did not hold within its bound.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: not within {timeout:?}")]
pub struct NotWithin {
    pub what: String,
    pub timeout: Duration,
}

/// What a check returns: `bool` (holds or not), `Option<T>` (the value once
/// it is there), or either inside a `Result` whose error ends the wait at
/// once (a failed read is not "not yet").
pub trait Check {
    type Output;
    type Error: From<NotWithin>;
    /// `Ok(Some(_))`: done; `Ok(None)`: check again; `Err(_)`: give up.
    fn outcome(self) -> Result<Option<Self::Output>, Self::Error>;
}

impl Check for bool {
    type Output = ();
    type Error = NotWithin;
    fn outcome(self) -> Result<Option<()>, NotWithin> {
        Ok(self.then_some(()))
    }
}

impl<T> Check for Option<T> {
    type Output = T;
    type Error = NotWithin;
    fn outcome(self) -> Result<Option<T>, NotWithin> {
        Ok(self)
    }
}

impl<E: From<NotWithin>> Check for Result<bool, E> {
    type Output = ();
    type Error = E;
    fn outcome(self) -> Result<Option<()>, E> {
        self.map(|done| done.then_some(()))
    }
}

impl<T, E: From<NotWithin>> Check for Result<Option<T>, E> {
    type Output = T;
    type Error = E;
    fn outcome(self) -> Result<Option<T>, E> {
        self
    }
}

impl From<Infallible> for NotWithin {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

/// Checks `check` every [`POLL_INTERVAL`] until it holds, and returns its
/// value; after `timeout` (checked once more at the end) fails with
/// [`NotWithin`] naming `what`. A check's own error ends the wait at once.
pub fn eventually<C: Check>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> C,
) -> Result<C::Output, C::Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let past = Instant::now() > deadline;
        if let Some(value) = check().outcome()? {
            return Ok(value);
        }
        if past {
            return Err(NotWithin {
                what: what.to_owned(),
                timeout,
            }
            .into());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_check_holds() {
        let mut calls = 0;
        let value = eventually(Duration::from_secs(5), "third call", || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(value.expect("held"), 3);
    }

    #[test]
    fn names_what_did_not_happen() {
        let err = eventually(Duration::from_millis(50), "the moon turned blue", || false)
            .expect_err("never holds");
        assert_eq!(err.to_string(), "the moon turned blue: not within 50ms");
    }

    #[test]
    fn a_failed_check_ends_the_wait_at_once() {
        let mut calls = 0;
        let err = eventually(Duration::from_secs(60), "unreadable", || {
            calls += 1;
            Err::<bool, _>(anyhow::anyhow!("read failed"))
        })
        .expect_err("the check failed");
        assert_eq!((err.to_string(), calls), ("read failed".to_owned(), 1));
    }
}
