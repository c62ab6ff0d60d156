//! The report of `tcpgate policy explain`: one serializable value, printed
//! as JSON or as a table for people.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::auth::explain::{Explanation, RuleOutcome, RuleTrace};
use crate::auth::{TokenError, ValidatedToken};

#[derive(Debug, Serialize)]
pub struct Report {
    /// The validated token; `None` when it failed validation.
    pub token: Option<TokenReport>,
    /// Which validation check failed.
    pub token_error: Option<Problem>,
    /// The destination asked about (`--dest`).
    pub dest: Option<String>,
    /// Every rule tried, in order; rules after the deciding one are not.
    pub rules: Vec<RuleReport>,
    pub decision: DecisionReport,
}

#[derive(Debug, Serialize)]
pub struct TokenReport {
    pub issuer: String,
    pub subject: String,
    pub expires_at: String,
    pub claims: Map<String, Value>,
}

#[derive(Debug, Serialize)]
pub struct Problem {
    /// The stable reason code (as in audit lines and metrics).
    pub reason: &'static str,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct RuleReport {
    pub name: String,
    pub outcome: Outcome,
    pub issuer: CheckReport,
    pub claims: Vec<CheckReport>,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    NotApplicable,
    DestinationNotAllowed,
    Allowed,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub claim: String,
    pub expected: String,
    /// The token's value; `null` when it has no such claim.
    pub actual: Option<Value>,
    pub matched: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct DecisionReport {
    pub allowed: bool,
    pub rule: Option<String>,
    pub destinations: Vec<String>,
    pub expires_at: Option<String>,
    pub lifetime_secs: Option<u64>,
    /// Why not, when denied.
    pub denial: Option<Problem>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn rule_report(trace: &RuleTrace<'_>) -> RuleReport {
    let check = &trace.check;
    RuleReport {
        name: check.rule.name.clone(),
        outcome: match trace.outcome {
            RuleOutcome::NotApplicable => Outcome::NotApplicable,
            RuleOutcome::DestinationNotAllowed => Outcome::DestinationNotAllowed,
            RuleOutcome::Allowed => Outcome::Allowed,
        },
        issuer: CheckReport {
            claim: "iss".into(),
            expected: format!("{:?}", check.rule.issuer),
            actual: None,
            matched: check.issuer_matches,
            hint: None,
        },
        claims: check
            .claims
            .iter()
            .map(|c| CheckReport {
                claim: c.claim.to_owned(),
                expected: c.expected.to_string(),
                actual: c.actual.cloned(),
                matched: c.matched,
                hint: c.hint(),
            })
            .collect(),
    }
}

impl Report {
    pub fn explained(
        token: &ValidatedToken,
        dest: Option<SocketAddr>,
        explanation: &Explanation<'_>,
    ) -> Report {
        let mut rules: Vec<RuleReport> = explanation.rules.iter().map(rule_report).collect();
        for r in &mut rules {
            r.issuer.actual = Some(Value::String(token.issuer.clone()));
        }
        let decision = match &explanation.result {
            Ok(d) => DecisionReport {
                allowed: true,
                rule: Some(d.rule.clone()),
                destinations: d.destinations.iter().map(ToString::to_string).collect(),
                expires_at: Some(rfc3339(d.expires_at)),
                lifetime_secs: Some(
                    d.expires_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .as_secs(),
                ),
                denial: None,
            },
            Err(denial) => denied(denial.reason(), denial.to_string()),
        };
        Report {
            token: Some(TokenReport {
                issuer: token.issuer.clone(),
                subject: token.subject.clone(),
                expires_at: rfc3339(token.expires_at),
                claims: token.claims.clone(),
            }),
            token_error: None,
            dest: dest.map(|d| d.to_string()),
            rules,
            decision,
        }
    }

    pub fn invalid(error: &TokenError, key_problem: Option<String>) -> Report {
        let mut message = error.to_string();
        if let (TokenError::UnknownKid { .. }, Some(problem)) = (error, key_problem) {
            let _ = write!(message, " (the last key fetch failed: {problem})");
        }
        Report {
            token: None,
            token_error: Some(Problem {
                reason: error.reason(),
                message: message.clone(),
            }),
            dest: None,
            rules: Vec::new(),
            decision: denied(error.reason(), format!("token rejected: {message}")),
        }
    }

    /// The report for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if let Some(problem) = &self.token_error {
            let _ = writeln!(
                out,
                "token    INVALID ({}): {}",
                problem.reason, problem.message
            );
            let _ = writeln!(out, "result   DENIED: the token fails validation");
            return out;
        }
        if let Some(t) = &self.token {
            let _ = writeln!(out, "token    valid");
            let _ = writeln!(out, "  issuer   {}", t.issuer);
            let _ = writeln!(out, "  subject  {}", t.subject);
            let _ = writeln!(out, "  expires  {}", t.expires_at);
            let _ = writeln!(out, "claims");
            let pretty = serde_json::to_string_pretty(&t.claims).unwrap_or_default();
            for line in pretty.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        let _ = writeln!(
            out,
            "rules (in order; the first that applies and allows wins)"
        );
        for (i, rule) in self.rules.iter().enumerate() {
            let outcome = match rule.outcome {
                Outcome::NotApplicable => "does not apply",
                Outcome::DestinationNotAllowed => "applies, but does not allow the destination",
                Outcome::Allowed => "applies and allows: DECIDES",
            };
            let _ = writeln!(out, "  [{}] {}: {outcome}", i + 1, rule.name);
            for check in std::iter::once(&rule.issuer).chain(&rule.claims) {
                let actual = check
                    .actual
                    .as_ref()
                    .map_or_else(|| "(absent)".to_owned(), Value::to_string);
                let mark = if check.matched { "ok  " } else { "MISS" };
                let _ = write!(
                    out,
                    "      {mark} {:<28} expected {:<24} token has {actual}",
                    check.claim, check.expected
                );
                if let Some(hint) = check.hint {
                    let _ = write!(out, "  ({hint})");
                }
                out.push('\n');
            }
        }
        if let Some(dest) = &self.dest {
            let _ = writeln!(out, "dest     {dest}");
        }
        let d = &self.decision;
        match (&d.rule, &d.denial) {
            (Some(rule), _) => {
                let lifetime = Duration::from_secs(d.lifetime_secs.unwrap_or_default());
                let _ = writeln!(
                    out,
                    "result   ALLOWED by rule {rule}, until {} (lifetime {})",
                    d.expires_at.as_deref().unwrap_or("?"),
                    humantime::format_duration(lifetime)
                );
                for dest in &d.destinations {
                    let _ = writeln!(out, "  allows {dest}");
                }
            }
            (None, Some(p)) => {
                let _ = writeln!(out, "result   DENIED ({}): {}", p.reason, p.message);
            }
            (None, None) => {}
        }
        out
    }
}

fn denied(reason: &'static str, message: String) -> DecisionReport {
    DecisionReport {
        allowed: false,
        rule: None,
        destinations: Vec::new(),
        expires_at: None,
        lifetime_secs: None,
        denial: Some(Problem { reason, message }),
    }
}

/// The `iss` of a token that failed validation, read without trusting it:
/// only to say which issuer's keys could not be fetched.
pub fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}
