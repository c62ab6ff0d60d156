//! Why a connection was refused before admission: one enum for every deny
//! path (token, preamble, policy, grants, gate, session limits, accept loop).
//!
//! The strings are stable: audit lines, the `denied` metric's `reason`
//! label, grant API errors and client answers carry them, and operators
//! match on them.

/// A stable deny reason; [`DenyReason::as_str`] is its wire/audit name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    // Token validation.
    TokenExpired,
    TokenNotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingExp,
    BadSignature,
    UnknownKid,
    AlgNotAllowed,
    MalformedToken,
    // AWS identities ([auth.aws]).
    AwsRequestInvalid,
    AwsWrongServerId,
    AwsRequestStale,
    AwsRequestReplayed,
    StsBusy,
    StsRefused,
    StsUnavailable,
    // Reading the preamble.
    BadMagic,
    UnsupportedVersion,
    BadFlags,
    BadStatus,
    Oversized,
    Truncated,
    Timeout,
    EmptyToken,
    InvalidUtf8,
    NeedMore,
    IoError,
    // Policy.
    NoRuleMatched,
    DestinationNotAllowed,
    // Grants.
    Revoked,
    GrantLimit,
    GrantRevoked,
    GrantTableFull,
    // The gate's opening checks.
    PreambleIncomplete,
    GreetingNotRead,
    LatePreamble,
    PendingShed,
    // Before the gate: the accept loop and the session limit.
    SessionLimit,
    NotIntercepted,
    InternalError,
}

impl DenyReason {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TokenExpired => "token_expired",
            Self::TokenNotYetValid => "token_not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::MissingExp => "missing_exp",
            Self::BadSignature => "bad_signature",
            Self::UnknownKid => "unknown_kid",
            Self::AlgNotAllowed => "alg_not_allowed",
            Self::MalformedToken => "malformed_token",
            Self::AwsRequestInvalid => "aws_request_invalid",
            Self::AwsWrongServerId => "aws_wrong_server_id",
            Self::AwsRequestStale => "aws_request_stale",
            Self::AwsRequestReplayed => "aws_request_replayed",
            Self::StsBusy => "sts_busy",
            Self::StsRefused => "sts_refused",
            Self::StsUnavailable => "sts_unavailable",
            Self::BadMagic => "bad_magic",
            Self::UnsupportedVersion => "unsupported_version",
            Self::BadFlags => "bad_flags",
            Self::BadStatus => "bad_status",
            Self::Oversized => "oversized",
            Self::Truncated => "truncated",
            Self::Timeout => "timeout",
            Self::EmptyToken => "empty_token",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::NeedMore => "need_more",
            Self::IoError => "io_error",
            Self::NoRuleMatched => "no_rule_matched",
            Self::DestinationNotAllowed => "destination_not_allowed",
            Self::Revoked => "revoked",
            Self::GrantLimit => "grant_limit",
            Self::GrantRevoked => "grant_revoked",
            Self::GrantTableFull => "grant_table_full",
            Self::PreambleIncomplete => "preamble_incomplete",
            Self::GreetingNotRead => "greeting_not_read",
            Self::LatePreamble => "late_preamble",
            Self::PendingShed => "pending_shed",
            Self::SessionLimit => "session_limit",
            Self::NotIntercepted => "not_intercepted",
            Self::InternalError => "internal_error",
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
