//! The signed `GetCallerIdentity` request a runner hands to tcpgate, and
//! the bastion's checks on it before anything is sent to STS.
//!
//! On the wire (in the preamble, or as the grant API's bearer token) it is
//! `aws-sts.` followed by base64url (no padding) of this JSON:
//!
//! ```json
//! { "method": "POST", "url": "https://sts.eu-west-1.amazonaws.com/",
//!   "headers": { "Host": "…", "X-Amz-Date": "…", "X-Tcpgate-Server-Id": "…",
//!                "Authorization": "AWS4-HMAC-SHA256 …", … },
//!   "body": "Action=GetCallerIdentity&Version=2011-06-15" }
//! ```
//!
//! the same parts as Vault's `iam_http_request_method`, `iam_request_url`,
//! `iam_request_headers` and `iam_request_body`. The bastion cannot check
//! the signature (it has no secret); STS does. What the bastion checks is
//! what stops the request being used elsewhere or later: the server-id
//! header is signed and names this bastion, the date is recent, and the
//! request is a `GetCallerIdentity` and nothing else.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::sigv4::{self, Credentials};

/// What starts an AWS identity token (never a JWT: it has one dot).
pub const TOKEN_PREFIX: &str = "aws-sts.";
/// The header naming the bastion the request was signed for.
pub const SERVER_ID_HEADER: &str = "X-Tcpgate-Server-Id";
/// A random value the runner signs in, so that two requests signed in the
/// same second differ and each can be used once.
pub const NONCE_HEADER: &str = "X-Tcpgate-Nonce";
/// The only body accepted.
pub const BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
/// More headers than a signed GetCallerIdentity carries is not one.
const MAX_HEADERS: usize = 16;

/// A signed request as carried in a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRequest {
    pub method: String,
    pub url: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// Why a signed request is refused before STS is asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not an AWS identity token: {0}")]
    Encoding(String),
    #[error("only a POST of {BODY} is accepted, not {0}")]
    NotGetCallerIdentity(String),
    #[error("header {0} is missing")]
    MissingHeader(&'static str),
    #[error("header {0} is given twice (names are case-insensitive)")]
    DuplicateHeader(String),
    #[error("header {0:?} is not a valid HTTP header")]
    BadHeader(String),
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("the Authorization header is not a SigV4 one for STS: {0}")]
    BadAuthorization(String),
    #[error("signed header {0:?} is not in the request")]
    SignedButMissing(String),
    #[error("header {0} is not among the signed headers")]
    Unsigned(&'static str),
    #[error("signed for server id {given:?}, this bastion is {expected:?}")]
    WrongServerId { given: String, expected: String },
    #[error("X-Amz-Date {0:?} is not a YYYYMMDDTHHMMSSZ time")]
    BadDate(String),
    #[error("signed at {signed} ({age}), outside the {window:?} window")]
    Stale {
        signed: String,
        age: String,
        window: Duration,
    },
    #[error(
        "signed for STS at {given:?}, this bastion's is {expected:?} (sign for its sts_endpoint)"
    )]
    WrongHost { given: String, expected: String },
    #[error("signed for region {given:?}, this bastion accepts {expected:?}")]
    WrongRegion { given: String, expected: String },
}

/// A request that passed [`SignedRequest::check`]: what makes it unique,
/// and when it was signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The SigV4 signature (hex): no two signed requests share one.
    pub signature: String,
    pub signed_at: SystemTime,
}

/// What the bastion expects of a request.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub server_id: &'a str,
    /// The configured STS endpoint's `host[:port]` ([`authority`]).
    pub host: &'a str,
    pub max_age: Duration,
    pub region: Option<&'a str>,
}

/// The parts of a SigV4 `Authorization` header the bastion reads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Authz {
    date: String,
    region: String,
    service: String,
    signed: Vec<String>,
    signature: String,
}

fn parse_authorization(value: &str) -> Result<Authz, RequestError> {
    let bad = |why: &str| RequestError::BadAuthorization(why.to_owned());
    let rest = value
        .strip_prefix(sigv4::ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| bad("it does not start with AWS4-HMAC-SHA256"))?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',').map(str::trim) {
        match part.split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => return Err(bad("unexpected part")),
        }
    }
    let (credential, signed, signature) = match (credential, signed, signature) {
        (Some(c), Some(s), Some(g)) => (c, s, g),
        _ => {
            return Err(bad(
                "Credential, SignedHeaders and Signature are all needed",
            ));
        }
    };
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("the signature is not 64 hex digits"));
    }
    let scope: Vec<&str> = credential.split('/').collect();
    let [_key, date, region, service, "aws4_request"] = scope.as_slice() else {
        return Err(bad(
            "the credential scope is not KEY/DATE/REGION/SERVICE/aws4_request",
        ));
    };
    Ok(Authz {
        date: (*date).to_owned(),
        region: (*region).to_owned(),
        service: (*service).to_owned(),
        signed: signed.split(';').map(str::to_owned).collect(),
        signature: signature.to_ascii_lowercase(),
    })
}

impl SignedRequest {
    /// Decodes a token that starts with [`TOKEN_PREFIX`].
    pub fn decode(token: &str) -> Result<SignedRequest, RequestError> {
        let body = token.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            RequestError::Encoding(format!("it does not start with {TOKEN_PREFIX}"))
        })?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| RequestError::Encoding(format!("not base64url: {e}")))?;
        serde_json::from_slice(&json)
            .map_err(|e| RequestError::Encoding(format!("not the request JSON: {e}")))
    }

    /// The token form of this request.
    #[must_use]
    pub fn encode(&self) -> String {
        // Serializing a struct of strings cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Signs a `GetCallerIdentity` for `url` (the STS endpoint the runner
    /// names) with the server-id header among the signed ones.
    #[must_use]
    pub fn sign(
        url: &reqwest::Url,
        region: &str,
        server_id: &str,
        creds: &Credentials,
        now: SystemTime,
    ) -> SignedRequest {
        let amz_date = sigv4::amz_date(now);
        let host = authority(url);
        let mut headers = vec![
            ("Content-Type".to_owned(), CONTENT_TYPE.to_owned()),
            ("Host".to_owned(), host),
            ("X-Amz-Date".to_owned(), amz_date.clone()),
            (SERVER_ID_HEADER.to_owned(), server_id.to_owned()),
            (
                NONCE_HEADER.to_owned(),
                hex::encode(rand::random::<[u8; 16]>()),
            ),
        ];
        if let Some(token) = &creds.session_token {
            headers.push(("X-Amz-Security-Token".to_owned(), token.clone()));
        }
        let request = sigv4::Request {
            method: "POST",
            path: "/",
            query: &[],
            headers: &headers,
            body: BODY.as_bytes(),
        };
        let scope = sigv4::Scope {
            amz_date: &amz_date,
            region,
            service: "sts",
        };
        let authorization = sigv4::authorization(&request, &scope, creds);
        headers.push(("Authorization".to_owned(), authorization));
        SignedRequest {
            method: "POST".to_owned(),
            url: url.to_string(),
            headers: headers.into_iter().collect(),
            body: BODY.to_owned(),
        }
    }

    /// The header `name` (case-insensitive).
    fn header(&self, name: &'static str) -> Result<&str, RequestError> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .ok_or(RequestError::MissingHeader(name))
    }

    /// Everything the bastion checks before asking STS. The URL is not
    /// used: the request goes to the configured endpoint only.
    pub fn check(&self, expect: &Expect<'_>, now: SystemTime) -> Result<Checked, RequestError> {
        if self.method != "POST" || !is_get_caller_identity(&self.body) {
            let what = format!("{} {:?}", self.method, truncate(&self.body, 80));
            return Err(RequestError::NotGetCallerIdentity(what));
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(RequestError::TooManyHeaders);
        }
        let mut seen = std::collections::HashSet::new();
        for (name, value) in &self.headers {
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok || value.bytes().any(|b| b.is_ascii_control()) {
                return Err(RequestError::BadHeader(truncate(name, 64)));
            }
            if !seen.insert(name.to_ascii_lowercase()) {
                return Err(RequestError::DuplicateHeader(name.clone()));
            }
        }
        let authz = parse_authorization(self.header("Authorization")?)?;
        if authz.service != "sts" {
            return Err(RequestError::BadAuthorization(format!(
                "signed for service {:?}, not sts",
                authz.service
            )));
        }
        for (name, lower) in [
            ("Host", "host"),
            ("X-Amz-Date", "x-amz-date"),
            (SERVER_ID_HEADER, "x-tcpgate-server-id"),
        ] {
            self.header(name)?;
            if !authz.signed.iter().any(|s| s == lower) {
                return Err(RequestError::Unsigned(name));
            }
        }
        let host = self.header("Host")?;
        if !host.eq_ignore_ascii_case(expect.host) {
            return Err(RequestError::WrongHost {
                given: truncate(host, 128),
                expected: expect.host.to_owned(),
            });
        }
        // STS would refuse it anyway; refusing here saves the call.
        if let Some(missing) = authz
            .signed
            .iter()
            .find(|s| !self.headers.keys().any(|n| n.eq_ignore_ascii_case(s)))
        {
            return Err(RequestError::SignedButMissing(truncate(missing, 64)));
        }
        let given = self.header(SERVER_ID_HEADER)?;
        if given != expect.server_id {
            return Err(RequestError::WrongServerId {
                given: truncate(given, 128),
                expected: expect.server_id.to_owned(),
            });
        }
        let date = self.header("X-Amz-Date")?;
        let signed_at =
            sigv4::parse_amz_date(date).ok_or_else(|| RequestError::BadDate(truncate(date, 32)))?;
        if !date.starts_with(&authz.date) {
            return Err(RequestError::BadAuthorization(
                "the credential scope's date is not X-Amz-Date's".into(),
            ));
        }
        check_age(date, signed_at, now, expect.max_age)?;
        if let Some(region) = expect.region
            && authz.region != region
        {
            return Err(RequestError::WrongRegion {
                given: authz.region,
                expected: region.to_owned(),
            });
        }
        Ok(Checked {
            signature: authz.signature,
            signed_at,
        })
    }
}

/// The `Host` header a request to `url` carries: `host`, or `host:port`
/// when the URL names a port that is not the scheme's default.
#[must_use]
pub fn authority(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// Exactly the two parameters, in either order, nothing else.
fn is_get_caller_identity(body: &str) -> bool {
    let mut params: Vec<&str> = body.split('&').collect();
    params.sort_unstable();
    params == ["Action=GetCallerIdentity", "Version=2011-06-15"]
}

/// A request signed longer ago than `window`, or as far in the future, is
/// refused: the window is the replay bound.
fn check_age(
    date: &str,
    signed_at: SystemTime,
    now: SystemTime,
    window: Duration,
) -> Result<(), RequestError> {
    let (age, past) = match now.duration_since(signed_at) {
        Ok(age) => (age, true),
        Err(e) => (e.duration(), false),
    };
    if age <= window {
        return Ok(());
    }
    let age = humantime::format_duration(Duration::from_secs(age.as_secs()));
    Err(RequestError::Stale {
        signed: date.to_owned(),
        age: if past {
            format!("{age} ago")
        } else {
            format!("{age} ahead")
        },
        window,
    })
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
