//! Legitimate sessions that stream while a case does its damage: open-ended
//! echo streams, checked end to end with SHA-256 when they finish.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

use super::client::EchoClient;
use super::fixture::Fixture;

/// Echo streams running until [`Streams::finish`].
pub struct Streams {
    clients: Vec<EchoClient>,
}

impl Streams {
    /// Opens `n` echo streams through the agent, seeds from `seed_base`,
    /// each sending at most `rate` bytes per second: legitimate traffic
    /// to watch, not load that would drown what the case measures.
    pub fn start(fx: &Fixture, n: usize, seed_base: u64, rate: Option<u64>) -> Result<Self> {
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            let stream = fx.dial()?;
            let seed = seed_base.wrapping_add(i as u64);
            clients.push(match rate {
                Some(rate) => EchoClient::start_paced(stream, seed, rate)?,
                None => EchoClient::start(stream, seed)?,
            });
        }
        Ok(Self { clients })
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Bytes echoed back so far, per stream.
    pub fn received(&self) -> Vec<u64> {
        self.clients
            .iter()
            .map(|c| c.received_bytes.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// Waits (bounded) until every stream has had at least `bytes` more
    /// echoed back: they are all still moving data.
    pub fn wait_progress(&self, bytes: u64, timeout: Duration) -> Result<()> {
        let start = self.received();
        let (mut now, mut stuck) = (Vec::new(), Vec::new());
        tcpgate_tests::eventually(timeout, "every stream to move on", || {
            now = self.received();
            stuck = (0..now.len())
                .filter(|&i| now[i] < start[i] + bytes)
                .collect();
            stuck.is_empty()
        })
        .with_context(|| format!("streams {stuck:?} moved less than {bytes} bytes (at {now:?})"))
    }

    /// Stops every stream and checks it: no error, every byte echoed back
    /// with the same SHA-256 as sent, and the upstream received exactly
    /// what was sent. Returns the bytes moved each way in total.
    pub fn finish(self, fx: &Fixture) -> Result<u64> {
        for client in &self.clients {
            client.stop();
        }
        let mut total = 0;
        for client in self.clients {
            let seed = client.seed;
            let echoed = client.join()?;
            let (sent, received) = (&echoed.sent, &echoed.received);
            ensure!(
                sent.error.is_none() && received.error.is_none(),
                "legitimate stream {seed:#x} failed: sent {sent:?}, received {received:?}\n{}",
                fx.agent.logs_tail(20)
            );
            // The upstream's end first: it tells which direction went wrong.
            let report = fx.upstream.ledger.wait_for(seed, Duration::from_secs(20))?;
            let upstream_got = if report.received.digest == sent.digest {
                format!(
                    "the upstream received {} bytes, byte-exact",
                    report.received.bytes
                )
            } else {
                format!(
                    "the upstream received {} bytes, SHA-256 differs (the client-to-upstream direction is wrong)",
                    report.received.bytes
                )
            };
            ensure!(
                received.bytes == sent.bytes && received.digest == sent.digest,
                "legitimate stream {seed:#x}: sent {} bytes, {} came back, SHA-256 {}; {}; {upstream_got}",
                sent.bytes,
                received.bytes,
                if received.digest == sent.digest {
                    "equal"
                } else {
                    "differs"
                },
                echoed
                    .difference
                    .as_deref()
                    .unwrap_or("no byte differs from what was sent")
            );
            ensure!(
                report.received.error.is_none()
                    && report.received.bytes == sent.bytes
                    && report.received.digest == sent.digest,
                "legitimate stream {seed:#x}: the upstream's end differs: {report:?}"
            );
            total += sent.bytes;
        }
        Ok(total)
    }

    /// Hands the clients over, for cases that end them another way.
    pub fn into_clients(self) -> Vec<EchoClient> {
        self.clients
    }
}
