//! Parking a relay for a successor and resuming it: no byte lost, none
//! written twice, counters going on.

use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::datapath::stop_pair;

const LEN: usize = 8 << 20;

fn pattern(at: usize) -> u8 {
    // Not a power-of-two period, so a repeated or skipped chunk shows.
    (at % 251) as u8
}

fn meta() -> SessionMeta {
    let addr = "127.0.0.1:9".parse().expect("addr");
    SessionMeta {
        id: 7,
        grant_id: 0,
        started: SystemTime::now(),
        expires: None,
        client: addr,
        destination: addr,
        upstream: addr,
        auth_method: 0,
        subject: "".into(),
    }
}

/// A connected pair on loopback: (the end the relay holds, the peer).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (peer, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (accepted.expect("accept").0, peer.expect("connect"))
}

#[tokio::test]
async fn a_parked_relay_resumes_without_losing_or_repeating_a_byte() {
    let dp = Arc::new(UserspaceDatapath::new(Duration::from_secs(10)));
    let (client, mut client_peer) = pair().await;
    let (upstream, mut upstream_peer) = pair().await;
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..LEN).map(pattern).collect();
        for part in chunk.chunks(64 * 1024) {
            client_peer.write_all(part).await.expect("write");
        }
        client_peer.shutdown().await.expect("shutdown");
        client_peer
    });
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(LEN);
        upstream_peer.read_to_end(&mut got).await.expect("read");
        (got, upstream_peer)
    });
    let (stop, signal) = stop_pair();
    let first = tokio::spawn({
        let dp = Arc::clone(&dp);
        async move {
            dp.relay(&meta(), client, upstream, signal, RelayState::default())
                .await
        }
    });
    // Park it mid-stream, wherever the copy is.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(stop.stop(EndReason::HandedOver));
    let Relayed::Parked(parked) = first.await.expect("joined") else {
        panic!("the relay parks when handed over");
    };
    assert!(!parked.relay.up.closed || parked.relay.up.pending.is_empty());
    let carried = parked.relay.up.bytes;
    assert!(dp.live_counters(7).is_none(), "a parked relay is not live");
    let (_stop, signal) = stop_pair();
    let parked = *parked;
    let resumed = tokio::spawn({
        let dp = Arc::clone(&dp);
        async move {
            dp.relay(
                &meta(),
                parked.client,
                parked.upstream,
                signal,
                parked.relay,
            )
            .await
        }
    });
    let mut client_peer = writer.await.expect("writer");
    let (got, upstream_peer) = reader.await.expect("reader");
    assert_eq!(got.len(), LEN, "every byte arrived once");
    assert!(
        got.iter().enumerate().all(|(at, b)| *b == pattern(at)),
        "in order"
    );
    // The other direction's EOF passes too, and the relay ends.
    drop(upstream_peer);
    let mut rest = Vec::new();
    let _ = client_peer.read_to_end(&mut rest).await;
    let Relayed::Ended(outcome) = resumed.await.expect("joined") else {
        panic!("the resumed relay ends");
    };
    assert!(carried <= LEN as u64);
    assert_eq!(
        outcome.up.userspace_bytes, LEN as u64,
        "counters go on from the parked ones"
    );
}

#[test]
fn handed_state_keeps_only_what_is_unwritten() {
    let half = HalfState {
        pending: b"abcdef".to_vec(),
        closed: false,
        bytes: 10,
        written: 4,
    };
    let handed = half.handed();
    assert_eq!(handed.pending, b"ef");
    assert_eq!(handed.bytes, 10);
    let wire = serde_json::to_string(&handed).expect("serialize");
    let back: HalfState = serde_json::from_str(&wire).expect("deserialize");
    assert_eq!(back, handed);
}

/// A copy with a budget stops once it is spent and both sockets are read
/// to their last queued byte, and hands them back: what it wrote plus what
/// is still queued is the whole stream, in order.
#[tokio::test]
async fn a_spent_budget_hands_the_sockets_back_between_two_bytes() {
    const SENT: usize = 200 * 1024;
    const BUDGET: u64 = 64 * 1024;
    let dp = UserspaceDatapath::new(Duration::from_secs(10));
    let (client, mut client_peer) = pair().await;
    let (upstream, mut upstream_peer) = pair().await;
    let chunk: Vec<u8> = (0..SENT).map(pattern).collect();
    client_peer.write_all(&chunk).await.expect("write");
    let (_stop, signal) = stop_pair();
    let meta = meta();
    let copying = dp.copy_first(&meta, client, upstream, &signal, BUDGET);
    let reading = async {
        let mut got = vec![0u8; SENT];
        let mut at = 0;
        // The copy stops somewhere; read what it wrote, until it returns.
        while at < SENT {
            match tokio::time::timeout(
                Duration::from_millis(200),
                upstream_peer.read(&mut got[at..]),
            )
            .await
            {
                Ok(Ok(n)) if n > 0 => at += n,
                _ => break,
            }
        }
        got.truncate(at);
        got
    };
    let (first, mut copied_part) = tokio::join!(copying, reading);
    let CopyFirst::Spent {
        mut client,
        upstream: _,
        copied,
    } = first
    else {
        panic!("a session open both ways is handed back once the budget is spent");
    };
    assert!(copied.0 >= BUDGET, "the budget was spent: {copied:?}");
    assert_eq!(
        copied.0,
        copied_part.len() as u64,
        "every copied byte arrived"
    );
    assert_eq!(
        dp.live_counters(7).map(|(up, _)| up.userspace_bytes),
        Some(copied.0)
    );
    // The rest waits in the client socket, untouched.
    drop(client_peer);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.expect("rest");
    copied_part.extend_from_slice(&rest);
    assert_eq!(copied_part, chunk, "no byte lost, repeated or reordered");
    dp.forget_live(7);
    assert!(dp.live_counters(7).is_none());
}

/// A session that ends within the budget ends in the copy.
#[tokio::test]
async fn a_session_ending_within_the_budget_ends_in_the_copy() {
    let dp = UserspaceDatapath::new(Duration::from_secs(10));
    let (client, mut client_peer) = pair().await;
    let (upstream, mut upstream_peer) = pair().await;
    let (_stop, signal) = stop_pair();
    let peers = async {
        client_peer.write_all(b"ping").await.expect("write");
        client_peer.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.expect("read");
        upstream_peer.write_all(b"pong").await.expect("write");
        drop(upstream_peer);
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.expect("read");
        (got, back)
    };
    let meta = meta();
    let (first, (got, back)) = tokio::join!(
        dp.copy_first(&meta, client, upstream, &signal, 1 << 20),
        peers
    );
    assert_eq!(
        (got.as_slice(), back.as_slice()),
        (&b"ping"[..], &b"pong"[..])
    );
    let CopyFirst::Ended(outcome) = first else {
        panic!("the session ended within the budget");
    };
    assert_eq!(
        (
            outcome.up.userspace_bytes,
            outcome.down.userspace_bytes,
            outcome.reason
        ),
        (4, 4, EndReason::ClientClosed)
    );
    assert!(dp.live_counters(7).is_none());
}
