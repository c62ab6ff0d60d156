//! What a client holding a source grant sends first. A `tcpgate connect`
//! client sends a token preamble even when its address holds a grant; the
//! preamble must be read by the agent, never spliced to the upstream.

use std::io;
use std::time::Duration;

use nix::sys::socket::{MsgFlags, recv};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::auth::preamble::{MAGIC, Opening, opening};

/// The verdict on a granted connection's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// Nothing yet (a server-speaks-first protocol, or a slow client).
    Silent,
    /// The client's own protocol (or its end of the stream).
    Protocol,
    /// A preamble: read it as one.
    Preamble,
    /// A prefix of the magic that never grew into a verdict: refuse, since
    /// it may be the start of a preamble.
    Stuck,
    /// The upstream spoke while the client was still silent (a
    /// server-first protocol). Its bytes are relayed by [`relay_greeting`]
    /// until the client's own first bytes can be judged.
    UpstreamFirst,
}

/// Peeks at what is queued, without consuming it. `None`: nothing queued.
/// On `Undecided` the readiness is cleared too, so the next wait sleeps
/// until more bytes arrive instead of spinning on the ones already seen.
fn peek(client: &TcpStream) -> Option<Opening> {
    use std::os::fd::AsRawFd;
    let mut head = [0u8; MAGIC.len()];
    let seen = client.try_io(Interest::READABLE, || {
        match recv(
            client.as_raw_fd(),
            &mut head,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            // End of stream: nothing left that could leak.
            Ok(0) => Ok(Opening::Other),
            Ok(n) => match opening(&head[..n]) {
                Opening::Undecided => Err(io::ErrorKind::WouldBlock.into()),
                verdict => Ok(verdict),
            },
            Err(nix::errno::Errno::EAGAIN) => Err(io::ErrorKind::WouldBlock.into()),
            // A reset or other error: the session fails on its own, and
            // nothing of a preamble can be forwarded.
            Err(_) => Ok(Opening::Other),
        }
    });
    match seen {
        Ok(verdict) => Some(verdict),
        Err(_) if head[0] == MAGIC[0] => Some(Opening::Undecided),
        Err(_) => None,
    }
}

/// Whether the upstream sent something (or closed); clears a false
/// readiness otherwise.
fn upstream_spoke(upstream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut one = [0u8; 1];
    upstream
        .try_io(Interest::READABLE, || {
            recv(
                upstream.as_raw_fd(),
                &mut one,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)
        })
        .is_ok()
}

fn verdict(seen: Option<Opening>) -> Option<FirstBytes> {
    match seen {
        Some(Opening::Other) => Some(FirstBytes::Protocol),
        Some(Opening::Preamble) => Some(FirstBytes::Preamble),
        Some(Opening::Undecided) | None => None,
    }
}

/// Waits up to `wait` for the client's first bytes, and up to `patience`
/// once they start like the magic, for enough of them to decide.
pub async fn first_bytes(client: &TcpStream, wait: Duration, patience: Duration) -> FirstBytes {
    let start = Instant::now();
    let mut deadline = start + wait;
    let mut partial = false;
    loop {
        let seen = peek(client);
        if let Some(v) = verdict(seen) {
            return v;
        }
        if seen == Some(Opening::Undecided) && !partial {
            partial = true;
            deadline = start + patience.max(wait);
        }
        if tokio::time::timeout_at(deadline, client.readable())
            .await
            .is_err()
        {
            return if partial {
                FirstBytes::Stuck
            } else {
                FirstBytes::Silent
            };
        }
    }
}

/// For a connection admitted by its grant while silent: waits, once the
/// upstream is connected, for whichever side speaks first. The upstream
/// speaking means a server-first protocol: splice. The client speaking is
/// judged like [`first_bytes`]. Neither within `patience`: splice.
pub async fn first_speaker(
    client: &TcpStream,
    upstream: &TcpStream,
    patience: Duration,
) -> FirstBytes {
    let deadline = Instant::now() + patience;
    loop {
        let seen = peek(client);
        if let Some(v) = verdict(seen) {
            return v;
        }
        if seen == Some(Opening::Undecided) {
            // A magic prefix: wait for the rest, as at admission.
            let left = deadline.saturating_duration_since(Instant::now());
            return first_bytes(client, Duration::ZERO, left).await;
        }
        tokio::select! {
            ready = client.readable() => if ready.is_err() { return FirstBytes::Protocol },
            // Readiness can be a false positive: look before deciding.
            _ = upstream.readable() => if upstream_spoke(upstream) { return FirstBytes::UpstreamFirst },
            () = tokio::time::sleep_until(deadline) => return FirstBytes::Silent,
        }
    }
}

/// At most this much of an upstream's greeting is relayed before the
/// splice: greetings are small (an SSH banner and KEXINIT, an SMTP or MySQL
/// hello), and a server that streams to a silent client goes back to the
/// kernel path after this many bytes.
pub const GREETING_LIMIT: usize = 16 * 1024;

/// What [`relay_greeting`] saw, and how many upstream bytes it passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// `Protocol`, `Preamble`, `Stuck` or `Silent` (never `UpstreamFirst`).
    pub client: FirstBytes,
    /// Bytes read from the upstream and written to the client.
    pub relayed: u64,
}

/// The upstream spoke first: copies what it says to the client, in user
/// space, until the client's own first bytes can be judged, so the client's
/// direction is never spliced before its first bytes are seen. A late
/// preamble (a `tcpgate connect` client descheduled past the first-bytes
/// wait) is therefore caught here, whatever the timing, instead of being
/// spliced to the target. Bounded by `patience` and [`GREETING_LIMIT`]: a
/// client that stays silent that long, or while that much is relayed, is
/// spliced as it is; an upstream that closes ends the wait.
/// `None`: the client did not take the greeting within `patience`, so the
/// stream can no longer be spliced whole.
pub async fn relay_greeting(
    client: &mut TcpStream,
    upstream: &TcpStream,
    patience: Duration,
) -> Option<Greeting> {
    use tokio::io::AsyncWriteExt as _;
    let deadline = Instant::now() + patience;
    let mut relayed = 0u64;
    let mut buf = vec![0u8; GREETING_LIMIT];
    loop {
        let seen = peek(client);
        if let Some(client) = verdict(seen) {
            return Some(Greeting { client, relayed });
        }
        if seen == Some(Opening::Undecided) {
            let left = deadline.saturating_duration_since(Instant::now());
            let client = first_bytes(client, Duration::ZERO, left).await;
            return Some(Greeting { client, relayed });
        }
        let room = GREETING_LIMIT.saturating_sub(usize::try_from(relayed).unwrap_or(usize::MAX));
        if room == 0 {
            return Some(Greeting {
                client: FirstBytes::Silent,
                relayed,
            });
        }
        tokio::select! {
            ready = client.readable() => if ready.is_err() {
                return Some(Greeting { client: FirstBytes::Protocol, relayed });
            },
            ready = upstream.readable() => {
                if ready.is_err() {
                    return Some(Greeting { client: FirstBytes::Protocol, relayed });
                }
                match upstream.try_read(&mut buf[..room]) {
                    Ok(n) if n > 0 => {
                        let write = tokio::time::timeout_at(deadline, client.write_all(&buf[..n]));
                        if !matches!(write.await, Ok(Ok(()))) {
                            // A client that does not read its greeting, or is gone.
                            return None;
                        }
                        relayed += n as u64;
                    }
                    // A false readiness.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The upstream closed (or failed): nothing more to relay;
                    // the client's first bytes are still judged.
                    _ => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let client = first_bytes(client, left, left).await;
                        return Some(Greeting { client, relayed });
                    }
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                return Some(Greeting { client: FirstBytes::Silent, relayed });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dial = TcpStream::connect(listener.local_addr().expect("addr"));
        let (dialed, accepted) = tokio::join!(dial, listener.accept());
        (dialed.expect("dial"), accepted.expect("accept").0)
    }

    const WAIT: Duration = Duration::from_millis(50);
    const PATIENCE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn silence_protocol_and_preamble_are_told_apart() {
        let (_client, server) = pair().await;
        assert_eq!(
            first_bytes(&server, WAIT, PATIENCE).await,
            FirstBytes::Silent
        );

        let (mut client, server) = pair().await;
        client.write_all(b"SSH-2.0-x\r\n").await.expect("write");
        assert_eq!(
            first_bytes(&server, WAIT, PATIENCE).await,
            FirstBytes::Protocol
        );

        let (mut client, server) = pair().await;
        client.write_all(b"TCPG\x01\x00").await.expect("write");
        assert_eq!(
            first_bytes(&server, WAIT, PATIENCE).await,
            FirstBytes::Preamble
        );
    }

    #[tokio::test]
    async fn a_magic_prefix_waits_for_the_rest_and_is_never_taken_for_protocol() {
        // "TC" then, well after the first-bytes wait, "PG": a preamble.
        let (mut client, server) = pair().await;
        client.write_all(b"TC").await.expect("write");
        let late = tokio::spawn(async move {
            tokio::time::sleep(WAIT * 4).await;
            client.write_all(b"PG\x01").await.expect("write");
            client
        });
        assert_eq!(
            first_bytes(&server, WAIT, PATIENCE).await,
            FirstBytes::Preamble
        );
        drop(late.await.expect("join"));
        // "T" and nothing more: refused, not admitted.
        let (mut client, server) = pair().await;
        client.write_all(b"T").await.expect("write");
        assert_eq!(
            first_bytes(&server, WAIT, WAIT * 2).await,
            FirstBytes::Stuck
        );
        // "TX": not the magic, the client's own protocol.
        let (mut client, server) = pair().await;
        client.write_all(b"TX").await.expect("write");
        assert_eq!(
            first_bytes(&server, WAIT, PATIENCE).await,
            FirstBytes::Protocol
        );
        drop(client);
    }

    #[tokio::test]
    async fn after_admission_the_first_speaker_decides() {
        // The upstream greets first: its greeting is relayed next.
        let (_client, client_side) = pair().await;
        let (mut server, upstream_side) = pair().await;
        server.write_all(b"220 hello\r\n").await.expect("write");
        assert_eq!(
            first_speaker(&client_side, &upstream_side, PATIENCE).await,
            FirstBytes::UpstreamFirst
        );
        // A preamble arrives late, before any server byte: caught.
        let (mut client, client_side) = pair().await;
        let (_server, upstream_side) = pair().await;
        let late = tokio::spawn(async move {
            tokio::time::sleep(WAIT).await;
            client
                .write_all(b"TCPG\x01\x00\x00\x05")
                .await
                .expect("write");
            client
        });
        assert_eq!(
            first_speaker(&client_side, &upstream_side, PATIENCE).await,
            FirstBytes::Preamble
        );
        drop(late.await.expect("join"));
    }

    #[tokio::test]
    async fn a_relayed_greeting_lets_the_client_speak_and_catches_a_late_preamble() {
        use tokio::io::AsyncReadExt;
        for (answer, expected) in [
            (&b"EHLO runner\r\n"[..], FirstBytes::Protocol),
            (&b"TCPG\x01\x00\x00\x05"[..], FirstBytes::Preamble),
        ] {
            let (mut client, mut client_side) = pair().await;
            let (mut server, upstream_side) = pair().await;
            server.write_all(b"220 hello\r\n").await.expect("write");
            // The client answers only once it has read the greeting, as an
            // SMTP client does (or a descheduled `tcpgate connect`).
            let talker = tokio::spawn(async move {
                let mut greeting = [0u8; 11];
                client.read_exact(&mut greeting).await.expect("greeting");
                assert_eq!(&greeting, b"220 hello\r\n");
                client.write_all(answer).await.expect("answer");
                client
            });
            let greeting = relay_greeting(&mut client_side, &upstream_side, PATIENCE)
                .await
                .expect("the greeting is read");
            assert_eq!(
                greeting,
                Greeting {
                    client: expected,
                    relayed: 11
                }
            );
            drop(talker.await.expect("join"));
            // Nothing of the client's bytes reached the upstream.
            let mut buf = [0u8; 1];
            assert!(server.try_read(&mut buf).is_err());
        }
    }

    #[tokio::test]
    async fn a_streaming_server_goes_back_to_the_splice_after_the_greeting_limit() {
        use tokio::io::AsyncReadExt;
        let (mut client, mut client_side) = pair().await;
        let (mut server, upstream_side) = pair().await;
        server
            .write_all(&vec![7u8; 2 * GREETING_LIMIT])
            .await
            .expect("write");
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; GREETING_LIMIT];
            client.read_exact(&mut got).await.expect("read");
            client
        });
        let greeting = relay_greeting(&mut client_side, &upstream_side, PATIENCE)
            .await
            .expect("read by the client");
        let limit = u64::try_from(GREETING_LIMIT).expect("fits");
        assert_eq!(
            greeting,
            Greeting {
                client: FirstBytes::Silent,
                relayed: limit
            }
        );
        drop(reader.await.expect("join"));
    }
}
