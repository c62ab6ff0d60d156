//! `preamble`: the request and response codecs on arbitrary bytes.
//!
//! Beyond "no panic", every verdict is checked against the wire format:
//! an accepted message re-encodes to exactly the bytes it was read from,
//! `NeedMore(k)` is exact (k-1 more bytes of a valid continuation still need
//! one more; k more give a verdict), and each error names a real defect of
//! the input.

use tcpgate::auth::preamble::{
    self, HEADER_LEN, MAGIC, MAX_MESSAGE_LEN, MAX_TOKEN_LEN, PreambleError, VERSION,
};

/// Runs both parsers on `data`; returns a one-line summary of the verdicts.
pub fn check(data: &[u8]) -> String {
    format!(
        "request: {}; response: {}",
        check_request(data),
        check_response(data)
    )
}

/// Which of the two message kinds a check is about.
#[derive(Clone, Copy)]
enum Kind {
    Request,
    Response,
}

impl Kind {
    fn max_body(self) -> usize {
        match self {
            Kind::Request => MAX_TOKEN_LEN,
            Kind::Response => MAX_MESSAGE_LEN,
        }
    }

    /// Parses and returns the consumed length and the re-encoded message.
    fn parse(self, bytes: &[u8]) -> Result<(usize, Vec<u8>), PreambleError> {
        match self {
            Kind::Request => preamble::parse_preamble(bytes).map(|(p, n)| {
                assert_eq!(p.version, VERSION);
                assert!(!p.token.is_empty(), "an accepted token is never empty");
                let encoded = preamble::encode_preamble(&p.token)
                    .expect("an accepted token can be encoded again");
                (n, encoded)
            }),
            Kind::Response => preamble::parse_response(bytes)
                .map(|(r, n)| (n, preamble::encode_response(r.status, &r.message))),
        }
    }
}

fn check_request(data: &[u8]) -> String {
    check_kind(Kind::Request, data)
}

fn check_response(data: &[u8]) -> String {
    check_kind(Kind::Response, data)
}

fn check_kind(kind: Kind, data: &[u8]) -> String {
    match kind.parse(data) {
        Ok((n, encoded)) => {
            assert!(n <= data.len(), "consumed {n} of {} bytes", data.len());
            assert!(n >= HEADER_LEN && n - HEADER_LEN <= kind.max_body());
            assert_eq!(encoded, data[..n], "re-encoding gives back the bytes read");
            let (again, _) = kind.parse(&encoded).expect("the re-encoded form parses");
            assert_eq!(again, n, "the re-encoded form has the same length");
            check_prefixes(kind, &data[..n]);
            format!("ok ({n} bytes)")
        }
        Err(e) => {
            check_error(kind, data, &e);
            e.reason().to_owned()
        }
    }
}

/// Every proper prefix of a complete message is incomplete, never an error,
/// and never claims to need more than the message has.
fn check_prefixes(kind: Kind, message: &[u8]) {
    for m in 0..message.len() {
        match kind.parse(&message[..m]) {
            Err(PreambleError::NeedMore(k)) => {
                assert!(m + k <= message.len(), "prefix {m} asks for {k} more");
                if m >= HEADER_LEN {
                    assert_eq!(m + k, message.len(), "body prefix {m} asks for {k}");
                }
            }
            other => panic!("prefix of {m} bytes gave {other:?}, not NeedMore"),
        }
    }
}

/// The bytes a valid message would have at `pos`: a header with a one-byte
/// body length, then ASCII body bytes.
fn continuation(pos: usize) -> u8 {
    let header = [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION, 0, 0, 1];
    header.get(pos).copied().unwrap_or(b'a')
}

fn extended(data: &[u8], more: usize) -> Vec<u8> {
    let mut v = data.to_vec();
    v.extend((data.len()..data.len() + more).map(continuation));
    v
}

fn check_error(kind: Kind, data: &[u8], e: &PreambleError) {
    let magic_len = data.len().min(MAGIC.len());
    let declared =
        (data.len() >= HEADER_LEN).then(|| usize::from(u16::from_be_bytes([data[6], data[7]])));
    match (e, kind) {
        (PreambleError::BadMagic, _) => assert_ne!(data[..magic_len], MAGIC[..magic_len]),
        (PreambleError::UnsupportedVersion(v), _) => {
            assert_eq!(data.get(4), Some(v));
            assert_ne!(*v, VERSION);
        }
        (PreambleError::BadFlags(b), Kind::Request) => {
            assert_eq!(data.get(5), Some(b));
            assert_ne!(*b, 0);
        }
        (PreambleError::BadStatus(b), Kind::Response) => {
            assert_eq!(data.get(5), Some(b));
            assert!(*b > 2, "status {b} is a known one");
        }
        (PreambleError::Oversized { len, max }, _) => {
            assert_eq!(declared, Some(len - HEADER_LEN));
            assert_eq!(*max, HEADER_LEN + kind.max_body());
            assert!(len > max);
        }
        (PreambleError::EmptyToken, Kind::Request) => assert_eq!(declared, Some(0)),
        (PreambleError::InvalidUtf8, _) => {
            let body = &data[HEADER_LEN..HEADER_LEN + declared.expect("a full header")];
            assert!(std::str::from_utf8(body).is_err());
        }
        (PreambleError::NeedMore(k), _) => check_need_more(kind, data, *k, declared),
        (other, _) => panic!("a byte parser cannot fail with {other:?}"),
    }
}

/// `NeedMore(k)`: `k - 1` more bytes of a valid continuation still leave
/// the message incomplete (by exactly one byte), and `k` more settle
/// whatever `data` was waiting for.
fn check_need_more(kind: Kind, data: &[u8], k: usize, declared: Option<usize>) {
    assert!(k >= 1, "NeedMore(0)");
    match declared {
        None => assert_eq!(data.len() + k, HEADER_LEN, "a short header"),
        Some(len) => assert_eq!(data.len() + k, HEADER_LEN + len, "a short body"),
    }
    if k > 1 {
        match kind.parse(&extended(data, k - 1)) {
            Err(PreambleError::NeedMore(1)) => {}
            other => panic!("{} more bytes gave {other:?}, not NeedMore(1)", k - 1),
        }
    }
    let complete = kind.parse(&extended(data, k));
    if declared.is_some() {
        // The body is all there now; only its UTF-8 can still be wrong.
        match complete {
            Ok((n, _)) => assert_eq!(n, data.len() + k),
            Err(PreambleError::InvalidUtf8) => {}
            Err(other) => panic!("the completed body gave {other:?}"),
        }
    } else if let Err(PreambleError::NeedMore(more)) = complete {
        // The header is complete; what is left is the declared body.
        assert_eq!(data.len() + k, HEADER_LEN);
        assert!(more >= 1);
    }
}
