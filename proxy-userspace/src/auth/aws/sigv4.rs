//! AWS Signature Version 4 (header signing), for the one request a runner
//! signs: STS `GetCallerIdentity`. Small on purpose (the `aws-sigv4` crate
//! brings ~100 crates); checked against AWS's published test suite below.
//!
//! The request handed to the signer is already canonical in the ways AWS
//! leaves to the caller: the path is `/` or already URI-encoded, and query
//! pairs are already encoded. Header names are lower-cased, values trimmed
//! and inner runs of spaces collapsed, as the algorithm says.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Long-term or session credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret or the session token: they end up in logs.
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// What is signed: method, path, query, headers (name, value) and body.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// Where and when: `amz_date` is `YYYYMMDDTHHMMSSZ`.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub amz_date: &'a str,
    pub region: &'a str,
    pub service: &'a str,
}

impl Scope<'_> {
    fn credential_scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            &self.amz_date[..self.amz_date.len().min(8)],
            self.region,
            self.service
        )
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // An HMAC key may have any length: `new_from_slice` cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `value` trimmed, with inner runs of spaces collapsed to one.
fn canonical_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The canonical headers block and the `SignedHeaders` list (every header
/// given is signed).
fn canonical_headers(headers: &[(String, String)]) -> (String, String) {
    let mut lines: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), canonical_value(v)))
        .collect();
    lines.sort();
    let block: String = lines.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
    (block, names.join(";"))
}

/// The canonical request (exposed for tests and error reports).
#[must_use]
pub fn canonical_request(req: &Request<'_>) -> (String, String) {
    let mut query: Vec<(&str, &str)> = req.query.to_vec();
    query.sort_unstable();
    let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let (headers, signed) = canonical_headers(req.headers);
    let text = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        req.path,
        query.join("&"),
        headers,
        signed,
        sha256_hex(req.body)
    );
    (text, signed)
}

/// The `Authorization` header value for `req`, signed with `creds`.
#[must_use]
pub fn authorization(req: &Request<'_>, scope: &Scope<'_>, creds: &Credentials) -> String {
    let (creq, signed) = canonical_request(req);
    let credential_scope = scope.credential_scope();
    let string_to_sign = format!(
        "{ALGORITHM}\n{}\n{credential_scope}\n{}",
        scope.amz_date,
        sha256_hex(creq.as_bytes())
    );
    let date = &scope.amz_date[..scope.amz_date.len().min(8)];
    let k_date = hmac(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    let k_region = hmac(&k_date, scope.region.as_bytes());
    let k_service = hmac(&k_region, scope.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let signature = hex::encode(hmac(&k_signing, string_to_sign.as_bytes()));
    format!(
        "{ALGORITHM} Credential={}/{credential_scope}, SignedHeaders={signed}, Signature={signature}",
        creds.access_key_id
    )
}

/// `YYYYMMDDTHHMMSSZ` for `t` (UTC).
#[must_use]
pub fn amz_date(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// The time an `X-Amz-Date` value names, or `None` when it is not one.
#[must_use]
pub fn parse_amz_date(text: &str) -> Option<std::time::SystemTime> {
    let b = text.as_bytes();
    let shaped = b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
    if !shaped {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &text[0..4],
        &text[4..6],
        &text[6..8],
        &text[9..11],
        &text[11..13],
        &text[13..15]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

#[cfg(test)]
mod tests {
    //! Vectors from AWS's Signature Version 4 test suite
    //! (docs.aws.amazon.com/general/latest/gr/signature-v4-test-suite.html):
    //! credentials AKIDEXAMPLE, 2015-08-30T12:36:00Z, us-east-1, "service".
    use super::*;

    const DATE: &str = "20150830T123600Z";
    const HOST: &str = "example.amazonaws.com";
    const TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";

    fn creds() -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    fn sign(method: &str, query: &[(&str, &str)], extra: &[(&str, &str)], body: &str) -> String {
        let mut headers = vec![
            ("Host".to_owned(), HOST.to_owned()),
            ("X-Amz-Date".to_owned(), DATE.to_owned()),
        ];
        headers.extend(
            extra
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned())),
        );
        let req = Request {
            method,
            path: "/",
            query,
            headers: &headers,
            body: body.as_bytes(),
        };
        let scope = Scope {
            amz_date: DATE,
            region: "us-east-1",
            service: "service",
        };
        authorization(&req, &scope, &creds())
    }

    fn signature(authz: &str) -> &str {
        authz.rsplit_once("Signature=").map_or("", |(_, s)| s)
    }

    #[test]
    fn get_vanilla() {
        let a = sign("GET", &[], &[], "");
        assert_eq!(
            a,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    #[test]
    fn get_vanilla_query_order_key_case() {
        let a = sign(
            "GET",
            &[("Param2", "value2"), ("Param1", "value1")],
            &[],
            "",
        );
        assert_eq!(
            signature(&a),
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        );
    }

    #[test]
    fn get_header_value_trim() {
        let a = sign(
            "GET",
            &[],
            &[("My-Header1", " value1"), ("My-Header2", "\"a   b   c\"")],
            "",
        );
        assert!(a.contains("SignedHeaders=host;my-header1;my-header2;x-amz-date"));
        assert_eq!(
            signature(&a),
            "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"
        );
    }

    #[test]
    fn post_header_key_sort() {
        let a = sign("POST", &[], &[("My-Header1", "value1")], "");
        assert_eq!(
            signature(&a),
            "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c"
        );
    }

    #[test]
    fn post_x_www_form_urlencoded() {
        let a = sign(
            "POST",
            &[],
            &[("Content-Type", "application/x-www-form-urlencoded")],
            "Param1=value1",
        );
        assert!(a.contains("SignedHeaders=content-type;host;x-amz-date,"));
        assert_eq!(
            signature(&a),
            "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
        );
    }

    #[test]
    fn post_sts_header_before() {
        let a = sign("POST", &[], &[("X-Amz-Security-Token", TOKEN)], "");
        assert!(a.contains("SignedHeaders=host;x-amz-date;x-amz-security-token,"));
        assert_eq!(
            signature(&a),
            "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"
        );
    }

    #[test]
    fn amz_dates_round_trip_and_garbage_is_refused() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160);
        assert_eq!(amz_date(t), DATE);
        assert_eq!(parse_amz_date(DATE), Some(t));
        for bad in [
            "",
            "2015-08-30T12:36:00Z",
            "20150830T123600",
            "20151330T123600Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let mut c = creds();
        c.session_token = Some(TOKEN.into());
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("EXAMPLEKEY") && !shown.contains("AQoD"),
            "{shown}"
        );
    }
}
