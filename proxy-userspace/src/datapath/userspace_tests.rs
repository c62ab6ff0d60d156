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
