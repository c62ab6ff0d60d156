//! Wire types of the grant API, shared by the agent's server and the client.
//!
//! `POST /v1/grants` with `Authorization: Bearer <token>` and the JSON body
//! [`GrantRequest`] (both fields optional) answers [`GrantResponse`], or an
//! [`ApiError`] body with status 400 (bad request), 401 (token rejected) or
//! 403 (policy denied).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::destination::{Destination, DestinationSpec};
use super::grants::Grant;
use super::policy::Denial;
use super::token::TokenError;

/// Body of `POST /v1/grants`. Destinations and lifetime stay strings here so
/// the server reports bad ones as a 400 with a clear message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// Narrow the grant to these destinations (each must be allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destinations: Option<Vec<DestinationSpec>>,
    /// Shorten the grant, e.g. `"10m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
}

/// A [`GrantRequest`] with its fields parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedGrantRequest {
    pub destinations: Option<Vec<Destination>>,
    pub lifetime: Option<Duration>,
}

impl GrantRequest {
    pub fn new(destinations: Option<&[Destination]>, lifetime: Option<Duration>) -> GrantRequest {
        GrantRequest {
            destinations: destinations.map(|ds| ds.iter().map(Destination::to_spec).collect()),
            lifetime: lifetime.map(|d| humantime::format_duration(d).to_string()),
        }
    }

    /// Parses destinations and lifetime; the error is a ready 400 body.
    pub fn parse(&self) -> Result<ParsedGrantRequest, ApiError> {
        let destinations = match &self.destinations {
            None => None,
            Some(specs) if specs.is_empty() => {
                return Err(ApiError::bad_request(
                    "destinations: must not be an empty list",
                ));
            }
            Some(specs) => Some(
                specs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        Destination::parse(s).map_err(|errs| {
                            let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
                            ApiError::bad_request(format!("destinations[{i}]: {}", msgs.join("; ")))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let lifetime = match &self.lifetime {
            None => None,
            Some(raw) => match humantime::parse_duration(raw.trim()) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => return Err(ApiError::bad_request("lifetime: must be greater than zero")),
                Err(e) => {
                    return Err(ApiError::bad_request(format!(
                        "lifetime: `{raw}` is not a duration: {e}"
                    )));
                }
            },
        };
        Ok(ParsedGrantRequest {
            destinations,
            lifetime,
        })
    }
}

/// Successful answer to `POST /v1/grants`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantResponse {
    pub grant_id: String,
    /// RFC 3339, UTC.
    #[serde(with = "humantime_serde")]
    pub expires_at: SystemTime,
    /// The address the grant is bound to: the caller's source address.
    pub source: IpAddr,
    pub destinations: Vec<Destination>,
    pub subject: String,
    pub rule: String,
}

impl GrantResponse {
    /// The answer for a source-bound grant; `None` for a preamble grant.
    pub fn from_grant(grant: &Grant) -> Option<GrantResponse> {
        Some(GrantResponse {
            grant_id: grant.id.to_string(),
            expires_at: grant.expires_at,
            source: grant.source()?,
            destinations: grant.destinations.clone(),
            subject: grant.subject.clone(),
            rule: grant.rule.clone(),
        })
    }
}

/// Error body of the grant API: a stable reason code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// E.g. `token_expired`, `no_rule_matched`, `bad_request`, `missing_token`.
    pub error: String,
    pub message: String,
    /// HTTP status to answer with; not part of the body.
    #[serde(skip, default = "default_status")]
    pub status: u16,
}

fn default_status() -> u16 {
    500
}

impl ApiError {
    pub fn new(status: u16, error: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            error: error.to_owned(),
            message: message.into(),
            status,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", message)
    }

    /// No or unusable `Authorization: Bearer` header.
    pub fn missing_token() -> ApiError {
        ApiError::new(
            401,
            "missing_token",
            "an Authorization: Bearer <token> header is required",
        )
    }

    pub fn from_token_error(e: &TokenError) -> ApiError {
        ApiError::new(401, e.reason(), e.to_string())
    }

    pub fn from_denial(d: &Denial) -> ApiError {
        ApiError::new(403, d.reason(), d.to_string())
    }
}

impl From<&TokenError> for ApiError {
    fn from(e: &TokenError) -> Self {
        ApiError::from_token_error(e)
    }
}

impl From<&Denial> for ApiError {
    fn from(d: &Denial) -> Self {
        ApiError::from_denial(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_parses() {
        let json =
            r#"{"destinations":[{"prefix":"192.0.2.10","ports":["5432"]}],"lifetime":"10m"}"#;
        let req: GrantRequest = serde_json::from_str(json).expect("request");
        let parsed = req.parse().expect("valid");
        assert_eq!(parsed.lifetime, Some(Duration::from_secs(600)));
        let dests = parsed.destinations.expect("destinations");
        assert_eq!(dests[0].to_string(), "192.0.2.10/32 port 5432");
        assert_eq!(
            GrantRequest::new(Some(&dests), parsed.lifetime)
                .parse()
                .expect("valid")
                .destinations,
            Some(dests)
        );
        assert_eq!(
            serde_json::to_string(&GrantRequest::default()).expect("json"),
            "{}"
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let bad = |json: &str| {
            serde_json::from_str::<GrantRequest>(json)
                .expect("json")
                .parse()
                .expect_err("bad")
        };
        let e = bad(
            r#"{"destinations":[{"prefix":"192.0.2.0/24","ports":["5432"]},{"prefix":"x","ports":["0"]}]}"#,
        );
        assert_eq!((e.status, e.error.as_str()), (400, "bad_request"));
        assert!(e.message.starts_with("destinations[1]: "), "{}", e.message);
        assert!(
            bad(r#"{"lifetime":"soon"}"#)
                .message
                .starts_with("lifetime: ")
        );
        assert!(
            bad(r#"{"lifetime":"0s"}"#)
                .message
                .contains("greater than zero")
        );
        assert!(bad(r#"{"destinations":[]}"#).message.contains("empty"));
    }

    #[test]
    fn errors_carry_reason_codes_and_statuses() {
        let e = ApiError::from_token_error(&TokenError::Expired);
        assert_eq!(
            (e.status, e.error.as_str(), e.message.as_str()),
            (401, "token_expired", "token expired")
        );
        let d = ApiError::from_denial(&Denial::NoRuleMatched);
        assert_eq!((d.status, d.error.as_str()), (403, "no_rule_matched"));
        assert_eq!(
            serde_json::to_value(&d).expect("json")["error"],
            "no_rule_matched"
        );
        assert!(
            serde_json::to_value(&d)
                .expect("json")
                .get("status")
                .is_none()
        );
    }
}
