//! Sessions handed from one agent to its successor (`tcpgate run
//! --takeover`): the old agent parks each user-space relay at a write
//! boundary ([`park`]), the takeover code sends the sockets and this
//! state, and the successor goes on with the same session id
//! ([`resume`]). A session the successor could not take is resumed by the
//! old agent itself, which then drains it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::events::Ending;
use super::{Admitted, Services, Target};
use crate::datapath::userspace::{Parked, RelayState, Relayed};
use crate::datapath::{PartlyRead, SessionMeta, StopSignal};
use crate::registry::Admission;

/// What a successor needs to go on with a session, besides its sockets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedSession {
    /// Id, grant, subject, addresses, start and expiry.
    #[serde(flatten)]
    pub meta: SessionMeta,
    /// The audit context every line of the session repeats.
    #[serde(default)]
    pub claims: BTreeMap<String, serde_json::Value>,
    /// Bytes relayed to the client before the splice (see [`Admitted`]).
    #[serde(default)]
    pub relayed_down: u64,
    /// Bytes read and not yet written, half-close state, counters.
    pub relay: RelayState,
}

/// A parked session: its state and its two sockets.
#[derive(Debug)]
pub struct ParkedSession {
    pub handed: HandedSession,
    pub client: TcpStream,
    pub upstream: TcpStream,
}

/// Where sessions parked for a successor go while a handover collects
/// them. Closed outside a handover.
#[derive(Debug, Default)]
pub struct Parking {
    tx: Mutex<Option<mpsc::UnboundedSender<Box<ParkedSession>>>>,
}

impl Parking {
    /// Starts collecting parked sessions.
    pub fn open(&self) -> mpsc::UnboundedReceiver<Box<ParkedSession>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.tx.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Stops collecting: a session parked from now on is resumed here.
    pub fn close(&self) {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn give(&self, session: Box<ParkedSession>) -> Result<(), Box<ParkedSession>> {
        match &*self.tx.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(tx) => tx.send(session).map_err(|e| e.0),
            None => Err(session),
        }
    }
}

/// A relay parked by a handover: gives it to the collecting handover, or
/// (none collecting any more) resumes it in this agent.
pub(super) fn park(
    services: &Arc<Services>,
    meta: &SessionMeta,
    admitted: &Admitted,
    parked: Parked,
) {
    let session = Box::new(ParkedSession {
        handed: HandedSession {
            meta: meta.clone(),
            claims: (*admitted.claims).clone(),
            relayed_down: admitted.relayed_down,
            relay: parked.relay,
        },
        client: parked.client,
        upstream: parked.upstream,
    });
    if let Err(session) = services.parking.give(session) {
        tokio::spawn(resume(Arc::clone(services), *session, Resumed::Kept));
    }
}

/// Who goes on with a parked session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// A successor adopted it: its close line says `adopted`.
    Adopted,
    /// The successor could not take it: the old agent drains it.
    Kept,
}

/// Goes on with a parked session to its end: same id, same grant and
/// deadline (expiry and revocation end it as any session), counters that
/// go on from the handed-over ones. The session is registered by this
/// call, before the returned future first runs: an old agent waiting for
/// its sessions to end must not miss one it resumes, and a successor lists
/// (and revokes) what it adopted from the moment it says so.
pub fn resume(
    services: Arc<Services>,
    session: ParkedSession,
    how: Resumed,
) -> impl Future<Output = ()> + Send + 'static {
    let ParkedSession {
        handed,
        client,
        upstream,
    } = session;
    let meta = handed.meta;
    let mut admission = services.registry.admit_adopted(meta.id);
    let stop = admission.register(meta.clone());
    super::recheck_grant(&services, &meta);
    let admitted = Admitted {
        grant_id: meta.grant_id,
        subject: meta.subject.clone(),
        expires: meta.expires,
        auth_method: meta.auth_method,
        claims: handed.claims.into(),
        answer_preamble: false,
        opening_unseen: false,
        relayed_down: handed.relayed_down,
        partly_read: PartlyRead::No,
    };
    let relay = Relay {
        meta,
        admitted,
        client,
        upstream,
        state: handed.relay,
    };
    run(services, relay, how, admission, stop)
}

/// A resumed session's relay, before it runs.
struct Relay {
    meta: SessionMeta,
    admitted: Admitted,
    client: TcpStream,
    upstream: TcpStream,
    state: RelayState,
}

async fn run(
    services: Arc<Services>,
    relay: Relay,
    how: Resumed,
    admission: Admission,
    stop: StopSignal,
) {
    let Relay {
        meta,
        admitted,
        client,
        upstream,
        state,
    } = relay;
    let target = Target {
        destination: meta.destination,
        upstream: meta.upstream,
    };
    let clock = Instant::now();
    let relayed = services
        .datapath
        .relay(&meta, client, upstream, stop, state, PartlyRead::No)
        .await;
    let outcome = match relayed {
        Relayed::Ended(outcome) => outcome,
        Relayed::Parked(parked) => {
            // Taken over again: on to the next successor.
            park(&services, &meta, &admitted, *parked);
            return;
        }
    };
    let elapsed = SystemTime::now()
        .duration_since(meta.started)
        .unwrap_or_else(|_| clock.elapsed());
    let ending = Ending {
        meta: &meta,
        target: &target,
        admitted: &admitted,
        elapsed,
        handover: (how == Resumed::Adopted).then_some(crate::audit::Handover::Adopted),
    };
    ending.record(&services, outcome, admission);
}
