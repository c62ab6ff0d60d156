//! Deterministic pseudo-random payloads and streaming SHA-256, so a test can
//! push gigabytes through the proxy and check them with bounded memory.

use std::fmt;
use std::io::{self, Read, Write};
use std::thread;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

/// Size of the chunks generated, written and hashed at a time.
pub const CHUNK: usize = 64 * 1024;

/// A SHA-256 digest that prints as hex (so failed assertions are readable).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// `len` bytes of a stream determined by `seed`. Byte `i` depends only on
/// `seed` and `i`, so any part can be generated without the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub seed: u64,
    pub len: u64,
}

impl Payload {
    pub fn new(seed: u64, len: u64) -> Payload {
        Payload { seed, len }
    }

    /// Fills `buf` with the stream's bytes starting at `offset` (ignoring
    /// `len`: the stream itself is endless).
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut word_index = offset / 8;
        let mut skip = usize::try_from(offset % 8).unwrap_or(0);
        let mut rest = buf;
        // Misaligned head, then whole words, then the tail of the last word.
        while !rest.is_empty() {
            if skip == 0 && rest.len() >= 8 {
                let (words, tail) = rest.split_at_mut(rest.len() / 8 * 8);
                for chunk in words.chunks_exact_mut(8) {
                    chunk.copy_from_slice(&self.word(word_index).to_le_bytes());
                    word_index += 1;
                }
                rest = tail;
                continue;
            }
            let word = self.word(word_index).to_le_bytes();
            let take = (8 - skip).min(rest.len());
            rest[..take].copy_from_slice(&word[skip..skip + take]);
            rest = &mut rest[take..];
            skip = 0;
            word_index += 1;
        }
    }

    /// splitmix64 of the word index: counter based, so it is random-access.
    fn word(&self, index: u64) -> u64 {
        let mut z = self
            .seed
            .wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The SHA-256 of the whole payload.
    pub fn digest(&self) -> Digest {
        let mut hasher = Sha256::new();
        self.for_each_chunk(|chunk| {
            hasher.update(chunk);
            Ok(())
        })
        .unwrap_or(());
        Digest(hasher.finalize().into())
    }

    /// A reader that yields exactly the payload's bytes.
    pub fn reader(&self) -> PayloadReader {
        PayloadReader {
            payload: *self,
            pos: 0,
        }
    }

    /// The payload as a vector; only for small payloads.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut bytes = vec![0; usize::try_from(self.len).unwrap_or(usize::MAX)];
        self.fill(0, &mut bytes);
        bytes
    }

    fn for_each_chunk(&self, mut f: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        while offset < self.len {
            let n = usize::try_from((self.len - offset).min(CHUNK as u64)).unwrap_or(CHUNK);
            self.fill(offset, &mut buf[..n]);
            f(&buf[..n])?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// `Read` over a [`Payload`]; see [`Payload::reader`].
#[derive(Debug, Clone)]
pub struct PayloadReader {
    payload: Payload,
    pos: u64,
}

impl Read for PayloadReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.payload.len - self.pos;
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        self.payload.fill(self.pos, &mut buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Writes the whole payload to `w` in 64 KiB chunks and returns its digest.
/// Does not flush or shut down `w`.
pub fn write_payload(w: &mut impl Write, payload: &Payload) -> io::Result<Digest> {
    let mut hasher = Sha256::new();
    payload.for_each_chunk(|chunk| {
        hasher.update(chunk);
        w.write_all(chunk)
    })?;
    Ok(Digest(hasher.finalize().into()))
}

/// Reads `r` to EOF, hashing as it goes; returns the byte count and digest.
pub fn read_to_end_hashed(r: &mut impl Read) -> io::Result<(u64, Digest)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((total, Digest(hasher.finalize().into()))),
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

/// Reads exactly `n` bytes from `r`, hashing them; an early EOF is an
/// `UnexpectedEof` error saying how many bytes arrived.
pub fn read_exact_hashed(r: &mut impl Read, n: u64) -> io::Result<Digest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < n {
        let want = usize::try_from((n - got).min(CHUNK as u64)).unwrap_or(CHUNK);
        match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("stream ended after {got} of {n} bytes"),
                ));
            }
            Ok(k) => {
                hasher.update(&buf[..k]);
                got += k as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(Digest(hasher.finalize().into()))
}

/// A slow consumer: reads at most `chunk` bytes per call and sleeps `pause`
/// after each read, until `sleep_budget` of sleeping is used up; then it
/// reads at full speed, so a test can never be slowed without bound.
#[derive(Debug)]
pub struct SlowReader<R> {
    inner: R,
    chunk: usize,
    pause: Duration,
    sleep_budget: Duration,
}

impl<R: Read> SlowReader<R> {
    /// Default sleep budget: 10 s in total.
    pub fn new(inner: R, chunk: usize, pause: Duration) -> SlowReader<R> {
        SlowReader {
            inner,
            chunk: chunk.max(1),
            pause,
            sleep_budget: Duration::from_secs(10),
        }
    }

    pub fn with_sleep_budget(mut self, budget: Duration) -> SlowReader<R> {
        self.sleep_budget = budget;
        self
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for SlowReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = buf.len().min(self.chunk);
        let n = self.inner.read(&mut buf[..limit])?;
        if n > 0 && !self.sleep_budget.is_zero() {
            let pause = self.pause.min(self.sleep_budget);
            self.sleep_budget -= pause;
            thread::sleep(pause);
        }
        Ok(n)
    }
}

/// Reads until the stream ends (EOF or an error such as a reset): the bytes
/// read, and when it ended.
pub fn read_until_end(stream: &mut impl Read) -> (u64, std::time::SystemTime) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return (total, std::time::SystemTime::now()),
            Ok(n) => total += n as u64,
        }
    }
}

/// Half-closes every client, then checks that client `i` got its own
/// payload (`Payload::new(i, size)`) echoed back whole.
pub fn check_echoed(clients: &mut [std::net::TcpStream], size: u64) -> anyhow::Result<()> {
    for client in clients.iter() {
        client.shutdown(std::net::Shutdown::Write)?;
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let (len, digest) = read_to_end_hashed(client)?;
        anyhow::ensure!(
            len == size && digest == Payload::new(i as u64, size).digest(),
            "connection {i} corrupted ({len} bytes back)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_at_any_offset_matches_the_stream() {
        let p = Payload::new(7, 100);
        let whole = p.to_vec();
        for start in 0..20 {
            for len in [0, 1, 3, 8, 9, 17, 40] {
                let mut part = vec![0u8; len];
                p.fill(start as u64, &mut part);
                assert_eq!(part, whole[start..start + len], "start {start} len {len}");
            }
        }
    }

    #[test]
    fn seeds_give_different_streams() {
        assert_ne!(Payload::new(1, 64).to_vec(), Payload::new(2, 64).to_vec());
    }
}
