//! A transfer each way that stops at checkpoints, so a takeover provably
//! happens while both directions still have bytes to move, and the
//! one-shot servers the takeover tests stream to.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use sha2::{Digest as _, Sha256};

use crate::{Digest, ForwardFixture, Netns, Payload};

/// Bound on one leg of a transfer between two checkpoints.
const LEG_BOUND: Duration = Duration::from_secs(600);
const CHUNK: usize = 256 * 1024;

/// A transfer of `up` (client → server) and `down` (server → client)
/// bytes in `legs` legs: after each but the last, both directions stop
/// until [`SteppedTransfer::resume`].
pub struct SteppedTransfer {
    progress: Receiver<&'static str>,
    go: Vec<Sender<()>>,
    writer: JoinHandle<std::io::Result<()>>,
    reader: JoinHandle<std::io::Result<(u64, Digest)>>,
}

impl SteppedTransfer {
    pub fn start(stream: TcpStream, up: Payload, down: u64, legs: u64) -> Result<Self> {
        let (progress, progress_rx) = channel();
        let (go_writer, writer_go) = channel();
        let (go_reader, reader_go) = channel();
        let mut out = stream.try_clone()?;
        let mut input = stream;
        let writer_progress = progress.clone();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = vec![0u8; CHUNK];
            for leg in 0..legs {
                let (mut at, end) = (up.len * leg / legs, up.len * (leg + 1) / legs);
                while at < end {
                    let n = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
                    up.fill(at, &mut buf[..n]);
                    out.write_all(&buf[..n])?;
                    at += n as u64;
                }
                let _ = writer_progress.send("up");
                if leg + 1 < legs && writer_go.recv().is_err() {
                    return Err(std::io::Error::other("abandoned"));
                }
            }
            out.shutdown(Shutdown::Write)
        });
        let reader = std::thread::spawn(move || -> std::io::Result<(u64, Digest)> {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            for leg in 0..legs {
                let end = down * (leg + 1) / legs;
                while got < end {
                    let want = usize::try_from(end - got).unwrap_or(CHUNK).min(CHUNK);
                    let n = input.read(&mut buf[..want])?;
                    if n == 0 {
                        return Ok((got, Digest(hasher.finalize().into())));
                    }
                    hasher.update(&buf[..n]);
                    got += n as u64;
                }
                let _ = progress.send("down");
                if leg + 1 < legs && reader_go.recv().is_err() {
                    return Err(std::io::Error::other("abandoned"));
                }
            }
            // Anything past `down` is an error the caller sees in the count.
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    return Ok((got, Digest(hasher.finalize().into())));
                }
                hasher.update(&buf[..n]);
                got += n as u64;
            }
        });
        Ok(Self {
            progress: progress_rx,
            go: vec![go_writer, go_reader],
            writer,
            reader,
        })
    }

    /// Waits until both directions reached their next checkpoint.
    pub fn wait_checkpoint(&self) -> Result<()> {
        for _ in 0..2 {
            self.progress
                .recv_timeout(LEG_BOUND)
                .context("a direction did not reach its checkpoint")?;
        }
        Ok(())
    }

    pub fn resume(&self) {
        for go in &self.go {
            let _ = go.send(());
        }
    }

    /// Waits for the end of both directions; returns what the client read.
    pub fn finish(self) -> Result<(u64, Digest)> {
        self.resume();
        self.writer
            .join()
            .map_err(|_| anyhow!("writer panicked"))?
            .context("client upload")?;
        let read = self
            .reader
            .join()
            .map_err(|_| anyhow!("reader panicked"))?
            .context("client download")?;
        Ok(read)
    }
}

/// Checks the server's view (bytes read, digest) against what was sent.
pub fn check_digest(what: &str, got: (u64, Digest), sent: &Payload) -> Result<()> {
    ensure!(
        got.0 == sent.len && got.1 == sent.digest(),
        "{what}: {} of {} bytes arrived, or the SHA-256 differs",
        got.0,
        sent.len
    );
    Ok(())
}

/// One short session through the forward: the server greets first, so the
/// splice is in place before the client speaks and closes.
pub fn echo_once(fx: &ForwardFixture, message: &'static [u8]) -> Result<()> {
    let server = crate::serve_once(&fx.topo.target, fx.upstream_addr(), |mut s, _| {
        s.write_all(b"!")?;
        let got = crate::read_to_end_hashed(&mut s)?;
        s.shutdown(Shutdown::Write)?;
        anyhow::Ok(got)
    })?;
    let mut stream = fx.dial()?;
    let mut greeting = [0u8; 1];
    stream.read_exact(&mut greeting)?;
    stream.write_all(message)?;
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    ensure!(
        server.join()??.0 == message.len() as u64,
        "the agent forwards"
    );
    Ok(())
}

/// The upstream of a duplex transfer: it sends `reply`, half-closes, and
/// yields what it read (length and digest) once the client half-closes.
pub fn duplex_upstream(
    fx: &ForwardFixture,
    reply: Payload,
) -> Result<crate::OneShot<Result<(u64, Digest)>>> {
    duplex_server(&fx.topo.target, fx.upstream_addr(), reply)
}

/// [`duplex_upstream`] on any address of any namespace.
pub fn duplex_server(
    ns: &Netns,
    addr: std::net::SocketAddr,
    reply: Payload,
) -> Result<crate::OneShot<Result<(u64, Digest)>>> {
    Ok(crate::serve_once(ns, addr, move |mut stream, _| {
        let mut out = stream.try_clone()?;
        let writer = std::thread::spawn(move || {
            crate::write_payload(&mut out, &reply)?;
            out.shutdown(Shutdown::Write)
        });
        let got = crate::read_to_end_hashed(&mut stream)?;
        writer.join().map_err(|_| anyhow!("server writer"))??;
        Ok(got)
    })?)
}
