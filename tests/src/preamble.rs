//! The client side of tcpgate's token preamble, written from the wire
//! format documented in the README (independently of the agent's code, so
//! tests and benchmarks check the format rather than reuse it).
//!
//! Request: `"TCPG"`, version 1, flags 0, token length (u16 big-endian),
//! token. Answer: `"TCPG"`, version 1, status (0 ok, 1 denied, 2 error),
//! message length (u16 big-endian), UTF-8 message.

use std::io::{self, Read, Write};

/// The answer's status byte for an admitted connection.
pub const OK: u8 = 0;
/// The answer's status byte for a refused token.
pub const DENIED: u8 = 1;

/// The request preamble for `token`.
pub fn encode(token: &str) -> Vec<u8> {
    let mut out = b"TCPG\x01\x00".to_vec();
    out.extend_from_slice(&u16::try_from(token.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(token.as_bytes());
    out
}

/// The status and message length of an answer's 8-byte header (for
/// async readers; [`read_answer`] reads the whole frame).
pub fn answer_header(header: &[u8; 8]) -> io::Result<(u8, usize)> {
    if &header[..5] != b"TCPG\x01" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a tcpgate answer: {header:?}"),
        ));
    }
    Ok((
        header[5],
        usize::from(u16::from_be_bytes([header[6], header[7]])),
    ))
}

/// Reads one answer frame: (status, message).
pub fn read_answer(stream: &mut impl Read) -> io::Result<(u8, String)> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header)?;
    let (status, len) = answer_header(&header)?;
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message)?;
    let message =
        String::from_utf8(message).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((status, message))
}

/// Sends the preamble and returns the agent's answer.
pub fn authenticate(stream: &mut (impl Read + Write), token: &str) -> io::Result<(u8, String)> {
    stream.write_all(&encode(token))?;
    read_answer(stream)
}
