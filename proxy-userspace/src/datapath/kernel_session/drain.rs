//! Ending one direction: after its source's EOF, the peer is shut down
//! only once it holds every byte moved toward it (the drain barrier; see
//! [`crate::datapath::barrier`]).

use std::net::Shutdown;
use std::time::Instant;

use super::{BarrierState, Dir, DrainBarrier, Ending, Session, closed_reason, side_name};
use crate::datapath::watcher::Side;
use crate::sockopt;

impl Session<'_> {
    /// The source of direction `dir` reached EOF: shut the peer down once
    /// it holds every byte moved toward it (see [`Self::advance_barriers`]).
    pub(super) fn begin_drain(&mut self, dir: Dir) {
        let state = &mut self.dirs[dir];
        state.eof = true;
        state.barrier = Some(DrainBarrier::new(
            self.baselines[dir.peer()],
            self.dp.timeouts.drain,
            Instant::now(),
        ));
        self.first_close.get_or_insert(closed_reason(dir.source()));
        self.attempt = 0;
    }

    /// Shuts down each peer whose source reached EOF once it holds every
    /// redirected byte.
    pub(super) fn advance_barriers(&mut self) -> Option<Ending> {
        for dir in Dir::ALL {
            let (source, peer) = (dir.source(), dir.peer());
            if self.dirs[dir].barrier.is_none() {
                continue;
            }
            // Reading TCP_INFO takes the source socket's lock, so a FIN skb
            // the kernel is still processing (its data not yet through the
            // verdict) finishes before the counters below are read.
            if let Err(e) = sockopt::tcp_state(self.socket(source)) {
                return Some(Ending::internal(format!("TCP_INFO: {e}")));
            }
            // Redirected by the verdict, plus copied by the agent while the
            // direction had backpressure.
            let redirected = self.live(dir).kernel_bytes + self.dirs[dir].copied_total();
            let sent = match sockopt::bytes_sent(self.socket(peer)) {
                Ok(sent) => sent,
                Err(e) => {
                    return Some(Ending::internal(format!("peer state: {e}")));
                }
            };
            let Some(barrier) = self.dirs[dir].barrier.as_mut() else {
                continue;
            };
            match barrier.check(sent, redirected, Instant::now()) {
                BarrierState::Waiting => {}
                BarrierState::Done => {
                    self.dirs[dir].barrier = None;
                    let shut = match peer {
                        Side::Client => self.client.shutdown(Shutdown::Write),
                        Side::Upstream => self.upstream.shutdown(Shutdown::Write),
                    };
                    // ENOTCONN: the peer is already gone; its own event ends the session.
                    if let Err(e) = shut {
                        tracing::debug!(session = self.id, error = %e, "shutdown of peer failed");
                    }
                    self.dirs[dir].shut = true;
                }
                BarrierState::Stalled { behind } => {
                    let reason = self.first_close.unwrap_or(closed_reason(source));
                    return Some(Ending::Abort(
                        reason,
                        format!(
                            "{} stopped accepting data: {behind} bytes undelivered after {:?} without progress",
                            side_name(peer),
                            self.dp.timeouts.drain
                        ),
                    ));
                }
            }
        }
        None
    }
}
