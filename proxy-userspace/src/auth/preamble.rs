//! The in-band token preamble: the first bytes a client sends on a
//! connection, and the agent's one-message answer.
//!
//! ## Request (client → agent)
//!
//! ```text
//! offset  size  field
//! 0       4     magic   "TCPG" (0x54 0x43 0x50 0x47)
//! 4       1     version 1
//! 5       1     flags   0 (every other value is rejected; reserved)
//! 6       2     length  of the token, u16 big-endian, 1..=16376
//! 8       len   token   the JWT, ASCII (UTF-8 is checked)
//! ```
//!
//! The whole preamble is at most 16 KiB ([`MAX_PREAMBLE`]). The agent reads
//! exactly these bytes and not one more: the header, then exactly `length`
//! token bytes. Whatever the client sent after the preamble stays in the
//! socket for the upstream service (the kernel splices it later).
//!
//! ## Response (agent → client)
//!
//! ```text
//! offset  size  field
//! 0       4     magic   "TCPG"
//! 4       1     version 1
//! 5       1     status  0 = ok, 1 = denied, 2 = error
//! 6       2     length  of the message, u16 big-endian, 0..=1024
//! 8       len   message UTF-8, e.g. "token expired"
//! ```
//!
//! After an `ok` response the connection carries the client's protocol
//! unchanged; after `denied` or `error` the agent closes it.

use super::DenyReason;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const MAGIC: [u8; 4] = proxy_common::PREAMBLE_MAGIC;
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// Upper bound of a whole request preamble, header included.
pub const MAX_PREAMBLE: usize = 16 * 1024;
pub const MAX_TOKEN_LEN: usize = MAX_PREAMBLE - HEADER_LEN;
pub const MAX_MESSAGE_LEN: usize = 1024;

/// A parsed request preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    pub version: u8,
    pub token: String,
}

/// The agent's verdict in a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    Denied = 1,
    Error = 2,
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub message: String,
}

/// Why a preamble or response could not be read. `reason()` is stable.
#[derive(Debug, thiserror::Error)]
pub enum PreambleError {
    #[error("bad magic: the connection did not start with a tcpgate preamble")]
    BadMagic,
    #[error("unsupported preamble version {0}")]
    UnsupportedVersion(u8),
    #[error("preamble flags must be 0, got {0:#04x}")]
    BadFlags(u8),
    #[error("unknown response status {0}")]
    BadStatus(u8),
    #[error("length {len} exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("connection closed after {received} of {expected} bytes")]
    Truncated { received: usize, expected: usize },
    #[error("preamble not received within {0:?}")]
    Timeout(Duration),
    #[error("the token is empty")]
    EmptyToken,
    #[error("the payload is not valid UTF-8")]
    InvalidUtf8,
    #[error("incomplete: at least {0} more bytes needed")]
    NeedMore(usize),
    #[error("reading failed")]
    Io(#[source] std::io::Error),
}

impl PreambleError {
    /// Stable machine-readable reason for audit logs and metrics.
    pub fn reason(&self) -> &'static str {
        self.deny_reason().as_str()
    }

    #[must_use]
    pub fn deny_reason(&self) -> DenyReason {
        match self {
            PreambleError::BadMagic => DenyReason::BadMagic,
            PreambleError::UnsupportedVersion(_) => DenyReason::UnsupportedVersion,
            PreambleError::BadFlags(_) => DenyReason::BadFlags,
            PreambleError::BadStatus(_) => DenyReason::BadStatus,
            PreambleError::Oversized { .. } => DenyReason::Oversized,
            PreambleError::Truncated { .. } => DenyReason::Truncated,
            PreambleError::Timeout(_) => DenyReason::Timeout,
            PreambleError::EmptyToken => DenyReason::EmptyToken,
            PreambleError::InvalidUtf8 => DenyReason::InvalidUtf8,
            PreambleError::NeedMore(_) => DenyReason::NeedMore,
            PreambleError::Io(_) => DenyReason::IoError,
        }
    }
}

/// Checks the fixed header fields present in `bytes` (it may be shorter than
/// a header), so garbage is rejected from its first bytes on. Returns the
/// body length once the whole header is there.
fn check_header(
    bytes: &[u8],
    max_body: usize,
    third: fn(u8) -> Result<(), PreambleError>,
) -> Result<usize, PreambleError> {
    let n = bytes.len().min(MAGIC.len());
    if bytes[..n] != MAGIC[..n] {
        return Err(PreambleError::BadMagic);
    }
    if let Some(&v) = bytes.get(4)
        && v != VERSION
    {
        return Err(PreambleError::UnsupportedVersion(v));
    }
    if let Some(&b) = bytes.get(5) {
        third(b)?;
    }
    if bytes.len() < HEADER_LEN {
        return Err(PreambleError::NeedMore(HEADER_LEN - bytes.len()));
    }
    let len = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
    if len > max_body {
        return Err(PreambleError::Oversized {
            len: HEADER_LEN + len,
            max: HEADER_LEN + max_body,
        });
    }
    Ok(len)
}

fn check_flags(b: u8) -> Result<(), PreambleError> {
    if b == 0 {
        Ok(())
    } else {
        Err(PreambleError::BadFlags(b))
    }
}

fn check_status(b: u8) -> Result<(), PreambleError> {
    Status::from_u8(b).map(|_| ())
}

impl Status {
    fn from_u8(b: u8) -> Result<Status, PreambleError> {
        match b {
            0 => Ok(Status::Ok),
            1 => Ok(Status::Denied),
            2 => Ok(Status::Error),
            other => Err(PreambleError::BadStatus(other)),
        }
    }
}

fn token_from(body: &[u8]) -> Result<String, PreambleError> {
    if body.is_empty() {
        return Err(PreambleError::EmptyToken);
    }
    String::from_utf8(body.to_vec()).map_err(|_| PreambleError::InvalidUtf8)
}

/// Parses a request preamble from the start of `bytes`. Returns it with the
/// number of bytes it occupies; bytes after that belong to the client's
/// protocol. `NeedMore(n)` means `bytes` is a valid but incomplete prefix.
pub fn parse_preamble(bytes: &[u8]) -> Result<(Preamble, usize), PreambleError> {
    let len = check_header(bytes, MAX_TOKEN_LEN, check_flags)?;
    let total = HEADER_LEN + len;
    if bytes.len() < total {
        return Err(PreambleError::NeedMore(total - bytes.len()));
    }
    let token = token_from(&bytes[HEADER_LEN..total])?;
    Ok((
        Preamble {
            version: VERSION,
            token,
        },
        total,
    ))
}

/// Encodes a request preamble carrying `token`.
pub fn encode_preamble(token: &str) -> Result<Vec<u8>, PreambleError> {
    if token.is_empty() {
        return Err(PreambleError::EmptyToken);
    }
    let len = u16::try_from(token.len())
        .ok()
        .filter(|&l| usize::from(l) <= MAX_TOKEN_LEN)
        .ok_or(PreambleError::Oversized {
            len: HEADER_LEN + token.len(),
            max: MAX_PREAMBLE,
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + token.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, 0]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(token.as_bytes());
    Ok(out)
}

/// Reads exactly `buf.len()` bytes, counting what arrived before an EOF.
/// Never reads past `buf`, so nothing after the preamble is consumed.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    offset: usize,
    expected: usize,
) -> Result<(), PreambleError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => {
                return Err(PreambleError::Truncated {
                    received: offset + got,
                    expected,
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PreambleError::Io(e)),
        }
    }
    Ok(())
}

/// What the first bytes of a connection say about a preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// They start with the magic: a preamble (perhaps a broken one).
    Preamble,
    /// They differ from the magic: the client's own protocol.
    Other,
    /// Too few bytes to tell, and all of them match the magic so far.
    Undecided,
}

/// Classifies the first bytes of a connection by the magic alone, so that
/// even a bare `T` is never taken for the client's protocol too early.
#[must_use]
pub fn opening(bytes: &[u8]) -> Opening {
    let n = bytes.len().min(MAGIC.len());
    if bytes[..n] != MAGIC[..n] {
        Opening::Other
    } else if n == MAGIC.len() {
        Opening::Preamble
    } else {
        Opening::Undecided
    }
}

/// Reads one request preamble, and nothing beyond it, within `deadline`
/// for the whole preamble (a client trickling bytes cannot hold the slot).
/// A declared token length over `max_token` is refused before any buffer
/// is allocated. Do not hand this a buffered reader: its buffer would
/// swallow client data.
pub async fn read_preamble<R: AsyncRead + Unpin>(
    r: &mut R,
    deadline: Duration,
    max_token: usize,
) -> Result<Preamble, PreambleError> {
    let read = async {
        let mut header = [0u8; HEADER_LEN];
        fill(r, &mut header, 0, HEADER_LEN).await?;
        let len = check_header(&header, max_token.min(MAX_TOKEN_LEN), check_flags)?;
        let mut body = vec![0u8; len];
        fill(r, &mut body, HEADER_LEN, HEADER_LEN + len).await?;
        Ok(Preamble {
            version: VERSION,
            token: token_from(&body)?,
        })
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| PreambleError::Timeout(deadline))?
}

/// Encodes a response; a message over 1024 bytes is cut at a character
/// boundary rather than rejected, since it is only informative.
pub fn encode_response(status: Status, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_MESSAGE_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut out = Vec::with_capacity(HEADER_LEN + msg.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, status as u8]);
    // `end` is at most 1024, so it fits.
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Parses a response from the start of `bytes` (see [`parse_preamble`]).
pub fn parse_response(bytes: &[u8]) -> Result<(Response, usize), PreambleError> {
    let len = check_header(bytes, MAX_MESSAGE_LEN, check_status)?;
    let total = HEADER_LEN + len;
    if bytes.len() < total {
        return Err(PreambleError::NeedMore(total - bytes.len()));
    }
    let status = Status::from_u8(bytes[5])?;
    let message =
        std::str::from_utf8(&bytes[HEADER_LEN..total]).map_err(|_| PreambleError::InvalidUtf8)?;
    Ok((
        Response {
            status,
            message: message.to_owned(),
        },
        total,
    ))
}

/// Reads one response, and nothing beyond it, within `deadline`.
pub async fn read_response<R: AsyncRead + Unpin>(
    r: &mut R,
    deadline: Duration,
) -> Result<Response, PreambleError> {
    let read = async {
        let mut header = [0u8; HEADER_LEN];
        fill(r, &mut header, 0, HEADER_LEN).await?;
        let len = check_header(&header, MAX_MESSAGE_LEN, check_status)?;
        let mut body = vec![0u8; len];
        fill(r, &mut body, HEADER_LEN, HEADER_LEN + len).await?;
        let message = String::from_utf8(body).map_err(|_| PreambleError::InvalidUtf8)?;
        Ok(Response {
            status: Status::from_u8(header[5])?,
            message,
        })
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| PreambleError::Timeout(deadline))?
}
