//! The chaos upstream: serves the chaos protocol (see `wire.rs`) on the
//! target, and records what it saw on every connection. A connection that
//! does not start with the header is recorded as foreign: junk that
//! reached the upstream.

use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;
use sha2::{Digest as _, Sha256};
use tcpgate_tests::payload::CHUNK;
use tcpgate_tests::{AcceptLoop, Netns, accept_loop};

use super::wire::{
    HEADER_LEN, Kind, Leg, Order, Spec, drain_leg, empty_leg, leg, send_leg, set_linger_zero,
    wait_until_dead,
};

/// What the upstream saw on one connection.
#[derive(Debug, Clone)]
pub struct Report {
    pub spec: Option<Spec>,
    /// Up bytes received (Echo: also what was echoed).
    pub received: Leg,
    /// Down bytes sent.
    pub sent: Leg,
    /// The first bytes of a connection without a header.
    pub foreign: Option<Vec<u8>>,
    pub ended: Instant,
}

/// The shared record of everything an upstream served.
#[derive(Debug, Default)]
pub struct Ledger {
    reports: Mutex<Vec<Report>>,
    connections: AtomicU64,
    /// When a misbehaving session started to misbehave, by seed.
    marks: Mutex<Vec<(u64, Instant)>>,
    /// With [`Upstream::start_tracked`]: every accepted connection, to
    /// sever them all (see [`Ledger::sever`]).
    live: Mutex<Vec<TcpStream>>,
    tracked: bool,
}

impl Ledger {
    pub fn reports(&self) -> Vec<Report> {
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Connections accepted so far (reported or still running).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn foreign(&self) -> Vec<Vec<u8>> {
        self.reports()
            .into_iter()
            .filter_map(|r| r.foreign)
            .collect()
    }

    /// Waits (bounded) for the report of the session with `seed`.
    pub fn wait_for(&self, seed: u64, timeout: Duration) -> Result<Report> {
        let finished = format!("the upstream to finish session {seed:#x}");
        Ok(tcpgate_tests::eventually(timeout, &finished, || {
            self.reports()
                .into_iter()
                .find(|r| r.spec.is_some_and(|s| s.seed == seed))
        })?)
    }

    /// When the session with `seed` stopped reading (`StallAfter`).
    pub fn mark_of(&self, seed: u64) -> Option<Instant> {
        self.marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(s, _)| *s == seed)
            .map(|(_, at)| *at)
    }

    /// Aborts every connection this upstream ever accepted without a
    /// word on the wire if its link is down: SO_LINGER 0, so the final
    /// close destroys the socket at once instead of leaving an orphan
    /// retrying its FIN, and a shutdown to wake its handler.
    pub fn sever(&self) {
        for stream in self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = set_linger_zero(&stream);
            // Both ways: a handler may be blocked writing as well as reading.
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn push(&self, report: Report) {
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(report);
    }
}

/// The upstream service: an accept loop in `ns` on `addr`.
pub struct Upstream {
    pub ledger: Arc<Ledger>,
    _accept: AcceptLoop<()>,
}

impl Upstream {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::start_ledger(ns, addr, Ledger::default())
    }

    /// Also keeps a handle on every connection, so [`Ledger::sever`] can
    /// end them. A kept handle keeps the socket open after its handler
    /// closes it, so only for upstreams whose connections end by severing.
    pub fn start_tracked(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let ledger = Ledger {
            tracked: true,
            ..Ledger::default()
        };
        Self::start_ledger(ns, addr, ledger)
    }

    fn start_ledger(ns: &Netns, addr: SocketAddr, ledger: Ledger) -> Result<Self> {
        let ledger = Arc::new(ledger);
        let shared = Arc::clone(&ledger);
        let accept = accept_loop(ns, addr, usize::MAX, move |stream, _| {
            shared.connections.fetch_add(1, Ordering::SeqCst);
            if let Some(clone) = shared.tracked.then(|| stream.try_clone().ok()).flatten() {
                shared
                    .live
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(clone);
            }
            let report = serve(stream, &shared);
            shared.push(report);
        })?;
        Ok(Self {
            ledger,
            _accept: accept,
        })
    }
}

fn serve(mut stream: TcpStream, ledger: &Ledger) -> Report {
    let mut header = [0u8; HEADER_LEN as usize];
    let mut got = 0;
    while got < header.len() {
        match stream.read(&mut header[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let Some(spec) = Spec::decode(&header).filter(|_| got == header.len()) else {
        return Report {
            spec: None,
            received: empty_leg(),
            sent: empty_leg(),
            foreign: Some(header[..got].to_vec()),
            ended: Instant::now(),
        };
    };
    let (received, sent) = match spec.kind {
        Kind::Transfer {
            order,
            server_early_fin,
            ..
        } => serve_transfer(&mut stream, &spec, order, server_early_fin),
        Kind::Echo => serve_echo(&mut stream),
        Kind::ResetAfter => {
            let received = drain_leg(&mut stream, Some(spec.after));
            let _ = set_linger_zero(&stream);
            (received, empty_leg())
        }
        Kind::SlowThenReset => {
            let received = drain_paced(&mut stream, spec.up, spec.after);
            let _ = set_linger_zero(&stream);
            (received, empty_leg())
        }
        Kind::StallAfter => {
            let received = drain_leg(&mut stream, Some(spec.after));
            ledger
                .marks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((spec.seed, Instant::now()));
            wait_until_dead(&stream, Duration::from_secs(60));
            (received, empty_leg())
        }
    };
    Report {
        spec: Some(spec),
        received,
        sent,
        foreign: None,
        ended: Instant::now(),
    }
}

fn serve_transfer(
    stream: &mut TcpStream,
    spec: &Spec,
    order: Order,
    early_fin: bool,
) -> (Leg, Leg) {
    let spec = *spec;
    let send = move |stream: &mut TcpStream| {
        let sent = send_leg(stream, spec.down_payload(), None, None);
        if early_fin {
            let _ = stream.shutdown(Shutdown::Write);
        }
        sent
    };
    let (mut received, sent) = match order {
        Order::ClientFirst => {
            let received = drain_leg(stream, Some(spec.up));
            (received, send(stream))
        }
        Order::ServerFirst => {
            let sent = send(stream);
            (drain_leg(stream, Some(spec.up)), sent)
        }
        Order::Both => match stream.try_clone() {
            Ok(mut writer) => {
                let sending = std::thread::spawn(move || send(&mut writer));
                let received = drain_leg(stream, Some(spec.up));
                let sent = sending.join().unwrap_or_else(|_| Leg {
                    error: Some("writer panicked".into()),
                    ..empty_leg()
                });
                (received, sent)
            }
            Err(e) => (
                Leg {
                    error: Some(e.to_string()),
                    ..empty_leg()
                },
                empty_leg(),
            ),
        },
    };
    // Nothing may follow the client's payload but its FIN.
    let extra = drain_leg(stream, None);
    if received.error.is_none() && (extra.bytes > 0 || extra.error.is_some()) {
        received.error = Some(format!(
            "after the payload: {} extra bytes, {:?}",
            extra.bytes, extra.error
        ));
    }
    if !early_fin {
        let _ = stream.shutdown(Shutdown::Write);
    }
    (received, sent)
}

fn serve_echo(stream: &mut TcpStream) -> (Leg, Leg) {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    let error = loop {
        match stream.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                hasher.update(&buf[..n]);
                bytes += n as u64;
                if let Err(e) = stream.write_all(&buf[..n]) {
                    break Some(e.to_string());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e.to_string()),
        }
    };
    let _ = stream.shutdown(Shutdown::Write);
    let received = leg(bytes, hasher, error);
    (received.clone(), received)
}

/// Reads exactly `limit` bytes at `rate` bytes per second, hashing them.
fn drain_paced(stream: &mut TcpStream, limit: u64, rate: u64) -> Leg {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    let started = Instant::now();
    while bytes < limit {
        let want = usize::try_from((limit - bytes).min(CHUNK as u64)).unwrap_or(CHUNK);
        match stream.read(&mut buf[..want]) {
            Ok(0) => return leg(bytes, hasher, Some("EOF before the expected end".into())),
            Ok(n) => {
                hasher.update(&buf[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return leg(bytes, hasher, Some(e.to_string())),
        }
        let due = started + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    leg(bytes, hasher, None)
}
