//! A minimal HTTP/1.1 client for the agent's grant API: one request per
//! connection (`Connection: close`), over plain TCP or any stream (such as
//! [`crate::tls::client`]). No client library: callers run it on a
//! namespace thread ([`crate::Netns::run`]), where a library's own worker
//! threads would sit in the wrong namespace.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A request that failed, or an answer that is not HTTP/1.1.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP request to {addr}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("malformed HTTP answer ({what}): {answer:?}")]
    Malformed { what: &'static str, answer: String },
}

/// Status code and body (de-chunked) of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `POST path` with a JSON `body` and `Authorization: Bearer token`, over
/// plain TCP to `addr` from the calling thread's namespace.
pub fn post_json(
    addr: SocketAddr,
    path: &str,
    token: &str,
    body: &str,
) -> Result<Response, HttpError> {
    let io_error = |source| HttpError::Io {
        addr: addr.to_string(),
        source,
    };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io_error)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_error)?;
    let answer = exchange(
        &mut stream,
        &post_head(&addr.to_string(), path, token, body),
    )
    .map_err(io_error)?;
    parse_response(&answer)
}

/// The head and body of a JSON POST with a bearer token.
pub fn post_head(host: &str, path: &str, token: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Writes `request` and reads the whole answer, until the server closes.
pub fn exchange(stream: &mut (impl Read + Write), request: &str) -> io::Result<String> {
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// Status and body of an HTTP/1.1 answer, with a plain or chunked body.
pub fn parse_response(raw: &str) -> Result<Response, HttpError> {
    let malformed = |what| HttpError::Malformed {
        what,
        answer: raw.to_owned(),
    };
    let (head, body) = raw.split_once("\r\n\r\n").ok_or(malformed("no head end"))?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(malformed("status line"))?;
    let chunked = head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if !chunked {
        return Ok(Response {
            status,
            body: body.to_owned(),
        });
    }
    let mut rest = body;
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or(malformed("truncated chunk"))?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|_| malformed("chunk size"))?;
        if size == 0 {
            return Ok(Response { status, body: out });
        }
        out.push_str(after.get(..size).ok_or(malformed("truncated chunk"))?);
        rest = after
            .get(size..)
            .and_then(|tail| tail.strip_prefix("\r\n"))
            .ok_or(malformed("chunk end"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_bodies() {
        let plain = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            parse_response(plain).expect("ok"),
            Response {
                status: 200,
                body: "{}".into()
            }
        );
        let chunked = "HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n\
                       3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).expect("ok"),
            Response {
                status: 403,
                body: "abcde".into()
            }
        );
    }

    #[test]
    fn malformed_answers_say_what_is_wrong() {
        for (raw, what) in [
            ("garbage", "no head end"),
            ("HTTP/1.0 200 OK\r\n\r\n", "status line"),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
                "truncated chunk",
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabX",
                "chunk end",
            ),
        ] {
            match parse_response(raw) {
                Err(HttpError::Malformed { what: got, .. }) => assert_eq!(got, what, "{raw:?}"),
                other => panic!("{raw:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn exchange_writes_the_request_and_reads_to_the_end() {
        let head = post_head("h", "/v1/grants", "t.o.k", "{}");
        assert!(head.starts_with("POST /v1/grants HTTP/1.1\r\nHost: h\r\n"));
        assert!(head.contains("Authorization: Bearer t.o.k\r\n"));
        assert!(head.ends_with("Content-Length: 2\r\nConnection: close\r\n\r\n{}"));
        let answer = b"HTTP/1.1 201 Created\r\n\r\nok".to_vec();
        let mut stream = Duplex(io::Cursor::new(answer), Vec::new());
        let answer = exchange(&mut stream, &head).expect("in memory");
        assert_eq!(stream.1, head.as_bytes());
        assert_eq!(parse_response(&answer).expect("ok").body, "ok");
    }

    /// Reads from the first, writes to the second.
    struct Duplex(io::Cursor<Vec<u8>>, Vec<u8>);

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.1.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
