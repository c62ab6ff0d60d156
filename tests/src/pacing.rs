//! Readers and writers that pace or count what passes through them, for
//! the backpressure tests (a plain slow reader is
//! [`SlowReader`](crate::SlowReader)).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A reader or writer that pauses after every `burst` bytes, for at most
/// 300 ms in all, so a test is never slowed without bound.
pub struct Bursty<T> {
    inner: T,
    burst: u64,
    pause: Duration,
    since_pause: u64,
    sleep_budget: Duration,
}

impl<T> Bursty<T> {
    pub fn new(inner: T, burst: u64, pause: Duration) -> Self {
        Self {
            inner,
            burst,
            pause,
            since_pause: 0,
            sleep_budget: Duration::from_millis(300),
        }
    }

    fn moved(&mut self, n: usize) {
        self.since_pause += n as u64;
        if self.since_pause >= self.burst && !self.sleep_budget.is_zero() {
            let pause = self.pause.min(self.sleep_budget);
            self.sleep_budget -= pause;
            self.since_pause = 0;
            std::thread::sleep(pause);
        }
    }
}

impl<R: Read> Read for Bursty<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.moved(n);
        Ok(n)
    }
}

impl<W: Write> Write for Bursty<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.moved(n);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that publishes how many bytes it has written.
pub struct Counting<'a, W> {
    pub inner: &'a mut W,
    pub written: &'a AtomicU64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
