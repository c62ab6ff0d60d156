//! Payload generation and streaming hashes (no privileges needed).

use std::io::{ErrorKind, Read};
use std::time::Duration;

use tcpgate_tests::{
    Digest, Payload, SlowReader, read_exact_hashed, read_to_end_hashed, write_payload,
};

const LENGTHS: [u64; 4] = [0, 1, 65_536, 1_000_003];

#[test]
fn digest_matches_hash_of_written_bytes() {
    for len in LENGTHS {
        let payload = Payload::new(0x5eed ^ len, len);
        let mut written = Vec::new();
        let returned = write_payload(&mut written, &payload).expect("write to Vec");
        assert_eq!(written.len() as u64, len);
        let of_bytes = Digest::of(&written);
        assert_eq!(returned, of_bytes, "len {len}");
        assert_eq!(payload.digest(), of_bytes, "len {len}");
        assert_eq!(payload.to_vec(), written, "len {len}");
    }
}

#[test]
fn hashed_readers_agree_with_digest() {
    for len in LENGTHS {
        let payload = Payload::new(42, len);
        let (n, digest) = read_to_end_hashed(&mut payload.reader()).expect("read to end");
        assert_eq!((n, digest), (len, payload.digest()), "len {len}");
        let exact = read_exact_hashed(&mut payload.reader(), len).expect("read exact");
        assert_eq!(exact, payload.digest(), "len {len}");
    }
}

#[test]
fn read_exact_hashed_reports_a_short_stream() {
    let payload = Payload::new(1, 1000);
    let err = read_exact_hashed(&mut payload.reader(), 1001).expect_err("stream is 1 byte short");
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
    assert!(err.to_string().contains("1000 of 1001"), "{err}");
}

#[test]
fn different_seeds_give_different_digests() {
    assert_ne!(
        Payload::new(1, 4096).digest(),
        Payload::new(2, 4096).digest()
    );
}

#[test]
fn slow_reader_passes_bytes_through_in_small_reads() {
    let payload = Payload::new(9, 10_000);
    let mut slow = SlowReader::new(payload.reader(), 1000, Duration::from_millis(1));
    let mut first = [0u8; 4096];
    let n = slow.read(&mut first).expect("read");
    assert_eq!(n, 1000, "reads are capped at the chunk size");
    let (rest, _) = read_to_end_hashed(&mut slow).expect("read rest");
    assert_eq!(n as u64 + rest, 10_000);

    let mut slow = SlowReader::new(payload.reader(), 777, Duration::from_millis(1))
        .with_sleep_budget(Duration::from_millis(5));
    assert_eq!(
        read_to_end_hashed(&mut slow).expect("read"),
        (10_000, payload.digest())
    );
}
