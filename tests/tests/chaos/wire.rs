//! The chaos traffic protocol. Every legitimate connection starts with a
//! 40-byte header that tells the upstream what to do: move exact byte
//! counts in a given order (with early or late half-closes), echo an
//! open-ended stream, or misbehave (reset, stop reading). Payloads are
//! [`Payload`] streams keyed by a per-session seed; each side hashes what
//! it sends and what it receives with SHA-256, and the test compares the
//! two ends (see `upstream.rs` and `client.rs`).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tcpgate_tests::payload::CHUNK;
use tcpgate_tests::{Digest, Payload};

pub const MAGIC: [u8; 4] = *b"CHS1";
pub const HEADER_LEN: u64 = 40;
/// How a read that timed out (the client's bound) starts its error.
pub const HANG: &str = "hang: no byte and no close within the client's read timeout";
/// The down direction's payload seed differs from the up one.
const DOWN_SALT: u64 = 0x5eed_d0d0_5eed_d0d0;

/// Which side moves its bulk first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    ClientFirst,
    ServerFirst,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Exactly `up` bytes up and `down` bytes down. A side with an early
    /// FIN half-closes right after its payload, before it has read the
    /// other side's; otherwise it half-closes once it has read everything.
    Transfer {
        order: Order,
        client_early_fin: bool,
        server_early_fin: bool,
    },
    /// Echoes everything back until the client's FIN (open-ended streams).
    Echo,
    /// Reads `after` bytes, then resets the connection.
    ResetAfter,
    /// Reads `after` bytes, then stops reading: a zero window that never
    /// opens, held until the connection dies.
    StallAfter,
    /// Reads `up` bytes at `after` bytes per second, then resets.
    SlowThenReset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub kind: Kind,
    pub up: u64,
    pub down: u64,
    /// Unique per session: it names the session in the server's reports.
    pub seed: u64,
    /// Bytes before misbehaving (`ResetAfter`, `StallAfter`).
    pub after: u64,
}

impl Spec {
    pub fn transfer(seed: u64, up: u64, down: u64, order: Order) -> Self {
        let kind = Kind::Transfer {
            order,
            client_early_fin: false,
            server_early_fin: false,
        };
        Self::of(kind, seed, up, down, 0)
    }

    pub fn of(kind: Kind, seed: u64, up: u64, down: u64, after: u64) -> Self {
        Self {
            kind,
            up,
            down,
            seed,
            after,
        }
    }

    pub fn up_payload(&self) -> Payload {
        Payload::new(self.seed, self.up)
    }

    pub fn down_payload(&self) -> Payload {
        Payload::new(self.seed ^ DOWN_SALT, self.down)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let (kind, flags) = match self.kind {
            Kind::Transfer {
                order,
                client_early_fin,
                server_early_fin,
            } => (
                0,
                order as u8 | u8::from(client_early_fin) << 2 | u8::from(server_early_fin) << 3,
            ),
            Kind::Echo => (1, 0),
            Kind::ResetAfter => (2, 0),
            Kind::StallAfter => (3, 0),
            Kind::SlowThenReset => (4, 0),
        };
        let mut out = [0u8; HEADER_LEN as usize];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = kind;
        out[5] = flags;
        for (i, value) in [self.up, self.down, self.seed, self.after]
            .into_iter()
            .enumerate()
        {
            out[8 + 8 * i..16 + 8 * i].copy_from_slice(&value.to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8; HEADER_LEN as usize]) -> Option<Self> {
        if bytes[..4] != MAGIC {
            return None;
        }
        let field = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[8 + 8 * i..16 + 8 * i]);
            u64::from_be_bytes(word)
        };
        let flags = bytes[5];
        let order = match flags & 3 {
            0 => Order::ClientFirst,
            1 => Order::ServerFirst,
            2 => Order::Both,
            _ => return None,
        };
        let kind = match bytes[4] {
            0 => Kind::Transfer {
                order,
                client_early_fin: flags & 4 != 0,
                server_early_fin: flags & 8 != 0,
            },
            1 => Kind::Echo,
            2 => Kind::ResetAfter,
            3 => Kind::StallAfter,
            4 => Kind::SlowThenReset,
            _ => return None,
        };
        Some(Self::of(kind, field(2), field(0), field(1), field(3)))
    }
}

/// How one direction of a stream went: bytes and their SHA-256, and the
/// error that ended it early, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    pub bytes: u64,
    pub digest: Digest,
    pub error: Option<String>,
}

impl Leg {
    /// Whether this leg carried exactly the first `bytes` of `payload`'s
    /// stream (a prefix check needs no copy of what was sent).
    pub fn is_prefix_of(&self, payload: Payload) -> bool {
        self.bytes <= payload.len && Payload::new(payload.seed, self.bytes).digest() == self.digest
    }
}

/// Hashes everything read until EOF or an error; never fails.
pub fn drain_leg(stream: &mut TcpStream, limit: Option<u64>) -> Leg {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    loop {
        let want = limit.map_or(CHUNK as u64, |l| (l - bytes).min(CHUNK as u64));
        if want == 0 {
            break;
        }
        match stream.read(&mut buf[..usize::try_from(want).unwrap_or(CHUNK)]) {
            Ok(0) => {
                if limit.is_some() {
                    return leg(bytes, hasher, Some("EOF before the expected end".into()));
                }
                break;
            }
            Ok(n) => {
                hasher.update(&buf[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return leg(bytes, hasher, Some(e.to_string())),
        }
    }
    leg(bytes, hasher, None)
}

pub fn leg(bytes: u64, hasher: Sha256, error: Option<String>) -> Leg {
    Leg {
        bytes,
        digest: Digest(hasher.finalize().into()),
        error,
    }
}

/// Writes the first `len` bytes of `payload` (`None`: until `stop`), counting
/// progress; never fails.
pub fn send_leg(
    stream: &mut TcpStream,
    payload: Payload,
    stop: Option<&AtomicBool>,
    pace: Option<u64>,
) -> Leg {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let started = Instant::now();
    loop {
        if let Some(rate) = pace {
            let due = started + Duration::from_secs_f64(offset as f64 / rate.max(1) as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let n = match stop {
            Some(stop) if stop.load(Ordering::Relaxed) => break,
            Some(_) => CHUNK,
            None if offset >= payload.len => break,
            None => usize::try_from((payload.len - offset).min(CHUNK as u64)).unwrap_or(CHUNK),
        };
        payload.fill(offset, &mut buf[..n]);
        if let Err(e) = stream.write_all(&buf[..n]) {
            return leg(offset, hasher, Some(e.to_string()));
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    leg(offset, hasher, None)
}

pub fn empty_leg() -> Leg {
    leg(0, Sha256::new(), None)
}

pub fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads one linger struct that lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Blocks, without reading, until the socket reports an error or hang-up
/// (the peer reset it) or `timeout` passes.
pub fn wait_until_dead(stream: &TcpStream, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        // No requested events: poll reports only POLLERR and POLLHUP.
        let mut fds = [libc::pollfd {
            fd: stream.as_raw_fd(),
            events: 0,
            revents: 0,
        }];
        // SAFETY: one pollfd that lives for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
        if rc > 0 {
            return;
        }
    }
}

/// Reads to EOF, hashing and counting; when the stream must be a prefix
/// of `expected`, also finds where it first differs (to say what went
/// wrong, not only that it did).
pub fn read_counting(
    stream: &mut TcpStream,
    progress: &AtomicU64,
    expected: Option<Payload>,
) -> (Leg, Option<String>) {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    let mut difference = None;
    let ended = |bytes, hasher, error, difference| (leg(bytes, hasher, error), difference);
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return ended(bytes, hasher, None, difference),
            Ok(n) => {
                if let (None, Some(payload)) = (&difference, expected) {
                    difference = differs(payload, bytes, &buf[..n], &mut want[..n]);
                }
                hasher.update(&buf[..n]);
                bytes += n as u64;
                progress.store(bytes, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // SO_RCVTIMEO expired: neither a byte nor a close came.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return ended(bytes, hasher, Some(format!("{HANG}: {e}")), difference);
            }
            Err(e) => return ended(bytes, hasher, Some(e.to_string()), difference),
        }
    }
}

/// Where `got` (read at `offset`) first differs from `payload`, and whether
/// the bytes there repeat earlier ones (a duplicated block).
fn differs(payload: Payload, offset: u64, got: &[u8], want: &mut [u8]) -> Option<String> {
    payload.fill(offset, want);
    let at = got.iter().zip(want.iter()).position(|(g, w)| g != w)?;
    let pos = offset + at as u64;
    let probe = &got[at..got.len().min(at + 64)];
    let mut earlier = vec![0u8; probe.len()];
    let repeat = (1..=pos.min(1024 * 1024)).find(|back| {
        payload.fill(pos - back, &mut earlier);
        earlier == probe
    });
    Some(match repeat {
        Some(back) => {
            format!("first difference at byte {pos}: the {back} bytes before it arrive again")
        }
        None => format!("first difference at byte {pos}: bytes never sent there"),
    })
}
