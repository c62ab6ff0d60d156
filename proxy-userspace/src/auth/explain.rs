//! What the policy did with a token, rule by rule, for `tcpgate policy
//! explain`. The gate's decision and the explanation come from the same
//! loop ([`super::Policy::decide`] and [`super::Policy::explain`] share
//! it): a rule applies exactly when its [`RuleCheck`] says so.

use serde_json::Value;

use super::claims::lookup;
use super::matcher::Matcher;
use super::policy::{Decision, Denial, Rule};
use super::token::ValidatedToken;

/// One claim matcher of a rule, checked against a token.
#[derive(Debug, Clone)]
pub struct ClaimCheck<'a> {
    /// The claim path as written in the rule.
    pub claim: &'a str,
    pub expected: &'a Matcher,
    /// The token's value at that path; `None` when it has none.
    pub actual: Option<&'a Value>,
    pub matched: bool,
}

impl ClaimCheck<'_> {
    /// Why it cannot match, when the value has the wrong shape or is absent.
    #[must_use]
    pub fn hint(&self) -> Option<&'static str> {
        if self.matched {
            None
        } else {
            self.expected.hint(self.actual)
        }
    }
}

/// A rule's issuer and claim matchers, checked against a token. Every
/// matcher is checked (not only up to the first miss) so an explanation
/// can show them all.
#[derive(Debug, Clone)]
pub struct RuleCheck<'a> {
    pub rule: &'a Rule,
    pub issuer_matches: bool,
    pub claims: Vec<ClaimCheck<'a>>,
}

impl RuleCheck<'_> {
    /// Whether the rule applies to the token.
    #[must_use]
    pub fn applies(&self) -> bool {
        self.issuer_matches && self.claims.iter().all(|c| c.matched)
    }
}

impl Rule {
    /// Checks the rule's issuer and every claim matcher against `token`.
    #[must_use]
    pub fn check<'a>(&'a self, token: &'a ValidatedToken) -> RuleCheck<'a> {
        let claims = self
            .claims
            .iter()
            .map(|(claim, expected)| {
                let actual = lookup(&token.claims, claim);
                ClaimCheck {
                    claim,
                    expected,
                    actual,
                    matched: expected.matches(actual),
                }
            })
            .collect();
        RuleCheck {
            rule: self,
            issuer_matches: self.issuer == token.issuer,
            claims,
        }
    }
}

/// How one rule came out, in the order the rules were tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleOutcome {
    /// The issuer or a claim matcher did not match.
    NotApplicable,
    /// The rule applies, but its `allow` list does not cover the request.
    DestinationNotAllowed,
    /// The rule applies and allows the request: it decided.
    Allowed,
}

/// One rule tried.
#[derive(Debug, Clone)]
pub struct RuleTrace<'a> {
    pub check: RuleCheck<'a>,
    pub outcome: RuleOutcome,
}

/// Every rule tried (rules after the deciding one are not tried), and the
/// decision the gate would take.
#[derive(Debug, Clone)]
pub struct Explanation<'a> {
    pub rules: Vec<RuleTrace<'a>>,
    pub result: Result<Decision, Denial>,
}
