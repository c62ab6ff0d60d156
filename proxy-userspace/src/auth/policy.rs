//! Access policy: ordered rules, deny by default.
//!
//! A rule applies to a token when its `issuer` (required) equals the token's
//! issuer and every claim matcher in its `match` table matches. Rules are
//! tried in order and the first rule that applies *and* allows the requested
//! destination(s) wins. When some rule applied to the token but none allowed
//! the destination the denial is `destination_not_allowed`; when no rule
//! applied at all it is `no_rule_matched`.

use super::DenyReason;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use super::claims::check_path;
use super::config::{AuthConfig, FieldError, RuleConfig};
use super::destination::{Destination, is_covered, parse_prefix, set_contains};
use super::explain::{Explanation, RuleOutcome, RuleTrace};
use super::matcher::Matcher;
use super::token::ValidatedToken;

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub issuer: String,
    pub max_lifetime: Duration,
    pub claims: BTreeMap<String, Matcher>,
    pub allow: Vec<Destination>,
}

/// The ordered rule list.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// An access decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub rule: String,
    /// `min(token exp, now + rule.max_lifetime[, now + requested lifetime])`.
    pub expires_at: SystemTime,
    /// What the grant covers: the rule's allow list, or the narrower request.
    pub destinations: Vec<Destination>,
}

/// Why access was denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("no policy rule matches this token")]
    NoRuleMatched,
    #[error("destination {destination} is not allowed for this token (matching rules: {})", rules.join(", "))]
    DestinationNotAllowed {
        destination: String,
        rules: Vec<String>,
    },
}

impl Denial {
    /// Stable machine-readable reason for audit logs and metrics.
    pub fn reason(&self) -> &'static str {
        self.deny_reason().as_str()
    }

    #[must_use]
    pub fn deny_reason(&self) -> DenyReason {
        match self {
            Denial::NoRuleMatched => DenyReason::NoRuleMatched,
            Denial::DestinationNotAllowed { .. } => DenyReason::DestinationNotAllowed,
        }
    }
}

impl Rule {
    /// Whether the rule's issuer and claim matchers accept the token.
    pub fn applies_to(&self, token: &ValidatedToken) -> bool {
        self.check(token).applies()
    }
}

/// Where [`Policy::first_allowing`] records each rule it tries; `None` on
/// the gate's path, which needs only the decision.
type Trace<'a> = Option<Vec<RuleTrace<'a>>>;

impl Policy {
    pub fn new(rules: Vec<Rule>) -> Policy {
        Policy { rules }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Compiles the `[[policy]]` rules, reporting every invalid field.
    pub fn from_config(rules: &[RuleConfig], auth: &AuthConfig) -> Result<Policy, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, rc) in rules.iter().enumerate() {
            let path = rc.path(i);
            let name = rc.name.trim();
            if name.is_empty() {
                errors.push(FieldError::new(format!("{path}.name"), "must not be empty"));
            } else if let Some(first) = names.get(name) {
                errors.push(FieldError::new(
                    format!("{path}.name"),
                    format!("rule name `{name}` is already used by policy[{first}]"),
                ));
            } else {
                names.insert(name, i);
            }
            if let Some(rule) = compile_rule(rc, &path, auth, &mut errors) {
                compiled.push(rule);
            }
        }
        if errors.is_empty() {
            Ok(Policy { rules: compiled })
        } else {
            Err(errors)
        }
    }

    /// Decides a connection to `dest` authenticated by `token`.
    pub fn decide(
        &self,
        token: &ValidatedToken,
        dest: SocketAddr,
        now: SystemTime,
    ) -> Result<Decision, Denial> {
        self.decide_dest(token, dest, now, &mut None)
    }

    /// Decides a grant request: the grant may only narrow what the matching
    /// rule allows (`requested` destinations must each lie inside it) and its
    /// lifetime is the minimum of token, rule and request.
    pub fn decide_grant(
        &self,
        token: &ValidatedToken,
        requested: Option<Vec<Destination>>,
        requested_lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<Decision, Denial> {
        self.decide_request(token, requested, requested_lifetime, now, &mut None)
    }

    /// The decision of [`Policy::decide`] (with `dest`) or of a grant for
    /// everything a rule allows (without), with every rule tried and why.
    pub fn explain<'a>(
        &'a self,
        token: &'a ValidatedToken,
        dest: Option<SocketAddr>,
        now: SystemTime,
    ) -> Explanation<'a> {
        let mut trace = Some(Vec::new());
        let result = match dest {
            Some(dest) => self.decide_dest(token, dest, now, &mut trace),
            None => self.decide_request(token, None, None, now, &mut trace),
        };
        Explanation {
            rules: trace.unwrap_or_default(),
            result,
        }
    }

    fn decide_dest<'a>(
        &'a self,
        token: &'a ValidatedToken,
        dest: SocketAddr,
        now: SystemTime,
        trace: &mut Trace<'a>,
    ) -> Result<Decision, Denial> {
        self.first_allowing(
            token,
            |rule| set_contains(&rule.allow, dest),
            || dest.to_string(),
            trace,
        )
        .map(|rule| decision(rule, token, rule.allow.clone(), None, now))
    }

    fn decide_request<'a>(
        &'a self,
        token: &'a ValidatedToken,
        requested: Option<Vec<Destination>>,
        requested_lifetime: Option<Duration>,
        now: SystemTime,
        trace: &mut Trace<'a>,
    ) -> Result<Decision, Denial> {
        let rule = match &requested {
            None => self.first_allowing(token, |_| true, String::new, trace)?,
            Some(want) => self.first_allowing(
                token,
                |rule| !want.is_empty() && want.iter().all(|d| is_covered(d, &rule.allow)),
                || {
                    want.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                },
                trace,
            )?,
        };
        let destinations = requested.unwrap_or_else(|| rule.allow.clone());
        Ok(decision(rule, token, destinations, requested_lifetime, now))
    }

    /// The one loop behind every decision and explanation.
    fn first_allowing<'a>(
        &'a self,
        token: &'a ValidatedToken,
        allows: impl Fn(&Rule) -> bool,
        describe: impl FnOnce() -> String,
        trace: &mut Trace<'a>,
    ) -> Result<&'a Rule, Denial> {
        let mut applied = Vec::new();
        for rule in &self.rules {
            let check = rule.check(token);
            let outcome = match check.applies() {
                false => RuleOutcome::NotApplicable,
                true if allows(rule) => RuleOutcome::Allowed,
                true => RuleOutcome::DestinationNotAllowed,
            };
            if let Some(trace) = trace.as_mut() {
                trace.push(RuleTrace { check, outcome });
            }
            match outcome {
                RuleOutcome::Allowed => return Ok(rule),
                RuleOutcome::DestinationNotAllowed => applied.push(rule.name.clone()),
                RuleOutcome::NotApplicable => {}
            }
        }
        if applied.is_empty() {
            Err(Denial::NoRuleMatched)
        } else {
            Err(Denial::DestinationNotAllowed {
                destination: describe(),
                rules: applied,
            })
        }
    }

    /// Reports rule destinations outside the intercepted set: traffic to them
    /// would never reach the agent, so the rule is almost surely a mistake.
    pub fn check_within(&self, intercepted: &[Destination]) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            for (j, dest) in rule.allow.iter().enumerate() {
                if !is_covered(dest, intercepted) {
                    errors.push(FieldError::new(
                        format!("policy[{i}] ({}).allow[{j}]", rule.name),
                        format!("{dest} is not inside the intercepted destinations"),
                    ));
                }
            }
        }
        errors
    }
}

fn decision(
    rule: &Rule,
    token: &ValidatedToken,
    destinations: Vec<Destination>,
    requested_lifetime: Option<Duration>,
    now: SystemTime,
) -> Decision {
    let lifetime = requested_lifetime.map_or(rule.max_lifetime, |l| l.min(rule.max_lifetime));
    let by_rule = now.checked_add(lifetime).unwrap_or(token.expires_at);
    Decision {
        rule: rule.name.clone(),
        expires_at: by_rule.min(token.expires_at),
        destinations,
    }
}

/// A `match` key as TOML needs it written: quoted when it holds a dot.
fn quoted_key(claim: &str) -> String {
    if claim.contains('.') {
        format!("{claim:?}")
    } else {
        claim.to_owned()
    }
}

fn compile_rule(
    rc: &RuleConfig,
    path: &str,
    auth: &AuthConfig,
    errors: &mut Vec<FieldError>,
) -> Option<Rule> {
    let before = errors.len();
    match &rc.issuer {
        None => errors.push(FieldError::new(
            format!("{path}.issuer"),
            "required: name the [[auth.issuer]] (or [auth.aws] issuer) whose tokens this rule admits",
        )),
        Some(issuer) if !auth.has_issuer(issuer) => {
            errors.push(FieldError::new(
                format!("{path}.issuer"),
                format!("issuer `{issuer}` is not configured"),
            ));
        }
        Some(_) => {}
    }
    let max_lifetime = match rc.max_lifetime.get() {
        None => {
            let msg = format!(
                "`{}` is not a duration (examples: \"5m\", \"1h\")",
                rc.max_lifetime.raw()
            );
            errors.push(FieldError::new(format!("{path}.max_lifetime"), msg));
            None
        }
        Some(d) if d.is_zero() => {
            errors.push(FieldError::new(
                format!("{path}.max_lifetime"),
                "must be greater than zero",
            ));
            None
        }
        Some(d) => Some(d),
    };
    let mut claims = BTreeMap::new();
    for (claim, spec) in &rc.claims {
        if let Err(e) = check_path(claim) {
            errors.push(FieldError::new(format!("{path}.match"), e.to_string()));
            continue;
        }
        match Matcher::compile(spec) {
            Ok(m) => {
                claims.insert(claim.clone(), m);
            }
            Err(e) => errors.push(FieldError::new(
                format!("{path}.match.{}", quoted_key(claim)),
                e.to_string(),
            )),
        }
    }
    if rc.allow.is_empty() {
        errors.push(FieldError::new(
            format!("{path}.allow"),
            "must list at least one destination",
        ));
    }
    let mut allow = Vec::with_capacity(rc.allow.len());
    for (j, spec) in rc.allow.iter().enumerate() {
        let dpath = format!("{path}.allow[{j}]");
        let prefix = parse_prefix(&spec.prefix)
            .map_err(|e| errors.push(FieldError::new(format!("{dpath}.prefix"), e.to_string())))
            .ok();
        if spec.ports.is_empty() {
            errors.push(FieldError::new(
                format!("{dpath}.ports"),
                "must list at least one port or range",
            ));
        }
        let mut ports = Vec::with_capacity(spec.ports.len());
        for (k, p) in spec.ports.iter().enumerate() {
            match p.parse::<super::destination::PortRange>() {
                Ok(r) => ports.push(r),
                Err(e) => errors.push(FieldError::new(
                    format!("{dpath}.ports[{k}]"),
                    e.to_string(),
                )),
            }
        }
        if let Some(prefix) = prefix {
            allow.push(Destination { prefix, ports });
        }
    }
    (errors.len() == before).then(|| Rule {
        name: rc.name.trim().to_owned(),
        issuer: rc.issuer.clone().unwrap_or_default(),
        max_lifetime: max_lifetime.unwrap_or_default(),
        claims,
        allow,
    })
}
